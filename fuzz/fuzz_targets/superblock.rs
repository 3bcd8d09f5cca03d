//! `Superblock::decode` on arbitrary bytes, and on the same bytes with the checksum
//! made valid so that the field checks behind it are reached too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_md::md::superblock::{checksum, Superblock, MAX_DEVS, SB_FIXED_LEN};

fn check(buf: &[u8]) {
    let Ok(sb) = Superblock::decode(buf) else {
        return;
    };
    let bytes = sb.encode();
    let again = Superblock::decode(&bytes).expect("an encoded superblock decodes");
    let mut want = sb.clone();
    want.sb_csum = again.sb_csum;
    assert_eq!(again, want);
    // What a decoded superblock is used for must not panic either.
    let _ = sb.check_raid1();
    let _ = sb.check_device(sb.super_offset, u64::MAX);
    let _ = sb.check_device(8, 1 << 20);
    let _ = (sb.role(), sb.name(), sb.is_clean(), sb.array_state());
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= SB_FIXED_LEN {
        let max_dev = u32::from_le_bytes([data[220], data[221], data[222], data[223]]);
        if max_dev <= MAX_DEVS {
            let mut fixed = data.to_vec();
            let csum = checksum(&fixed, max_dev);
            fixed[216..220].copy_from_slice(&csum.to_le_bytes());
            check(&fixed);
        }
    }
});
