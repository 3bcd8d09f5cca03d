//! What arrives on the two sockets other processes write to: `lockd` frames
//! (length-prefixed JSON, both directions) and control-socket lines (JSON). Checked:
//! nothing panics, a frame longer than the limit is refused before it is read, and
//! what decodes encodes back to a frame that decodes to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_md::dlm::lockd::{read_frame, write_frame, Message, Request, MAX_FRAME};

fn roundtrip<T>(data: &[u8])
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut r = data;
    match read_frame::<T>(&mut r) {
        Ok(Some(v)) => {
            let mut out = Vec::new();
            write_frame(&mut out, &v).expect("a decoded frame encodes");
            let back = read_frame::<T>(&mut out.as_slice()).expect("re-read");
            assert_eq!(back.as_ref(), Some(&v));
        }
        Ok(None) => assert!(data.len() < 4),
        Err(_) => {}
    }
    if data.len() >= 4 {
        let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if n > MAX_FRAME {
            assert!(read_frame::<T>(&mut &data[..]).is_err());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<Request>(data);
    roundtrip::<Message>(data);
    if let Ok(req) = serde_json::from_slice::<vhost_user_md::serve::control::Request>(data) {
        let text = serde_json::to_vec(&req).expect("encode");
        let back: vhost_user_md::serve::control::Request =
            serde_json::from_slice(&text).expect("decode");
        assert_eq!(back, req);
    }
});
