//! Both cluster message layouts on arbitrary bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_md::md::message::{ClusterMsg, MsgType};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClusterMsg::decode_k64(data) {
        let b = m.encode_k64();
        // Bytes 44..48 are padding.
        assert_eq!(b[..44], data[..44]);
        assert_eq!(ClusterMsg::decode_k64(&b), Ok(m));
        assert_eq!(MsgType::from_u32(m.kind.to_u32()), m.kind);
    }
    if let Ok(m) = ClusterMsg::decode_u32(data) {
        let b = m.encode_u32();
        assert_eq!(b[..], data[..32]);
        assert_eq!(ClusterMsg::decode_u32(&b), Ok(m));
    }
});
