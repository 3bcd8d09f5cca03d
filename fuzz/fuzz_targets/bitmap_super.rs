//! `BitmapSuper::decode` on arbitrary bytes; what follows the 256-byte superblock is
//! taken as its bit array.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_md::md::bitmap::{BitmapBits, BitmapSuper, BITMAP_SB_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = BitmapSuper::decode(data) else {
        return;
    };
    let bytes = b.encode();
    // Everything up to the end of cluster_name is kept; the rest is padding.
    assert_eq!(bytes[..136], data[..136]);
    assert_eq!(BitmapSuper::decode(&bytes).as_ref(), Ok(&b));
    let _ = (b.is_clustered(), b.slots(), b.cluster_name());
    let g = b.geometry();
    let (chunks, bits_len, slot_len) = (g.chunks(), g.bits_len(), g.slot_len());
    assert!(bits_len * 8 >= chunks && slot_len >= bits_len + BITMAP_SB_LEN as u64);
    let _ = g.slot_offset(8, 8, b.slots());
    let _ = g.chunk_start(chunks);
    if let Ok(bits) = BitmapBits::from_bytes(&data[BITMAP_SB_LEN..], chunks) {
        assert!(bits.count_dirty() <= chunks);
        assert_eq!(
            BitmapBits::from_bytes(bits.as_bytes(), chunks).as_ref(),
            Ok(&bits)
        );
    }
});
