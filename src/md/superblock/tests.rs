use super::*;

/// The worked example of the spec, Appendix A, checked there against mdadm 4.2.
pub(crate) fn appendix_a() -> Superblock {
    let mut roles = vec![role::SPARE; 128];
    roles[0] = 0;
    roles[1] = 1;
    let mut sb = Superblock {
        feature_map: feature::BITMAP_OFFSET | feature::CLUSTERED,
        set_uuid: "3578507b:e0cb6d4f:6322696c:d7b1b10c".parse().unwrap(),
        set_name: [0; 32],
        ctime: 1_700_000_000,
        level: 1,
        layout: 0,
        size: 129_024,
        chunksize: 0,
        raid_disks: 2,
        bitmap_offset: 8,
        new_level: 0,
        reshape_position: 0,
        delta_disks: 0,
        new_layout: 0,
        new_chunk: 0,
        new_offset: 0,
        data_offset: 2048,
        data_size: 129_024,
        super_offset: 8,
        recovery_offset: 0,
        dev_number: 0,
        cnt_corrected_read: 0,
        device_uuid: Uuid([0x11; 16]),
        devflags: 0,
        bblog_shift: 0,
        bblog_size: 0,
        bblog_offset: 0,
        utime: 1_700_000_000,
        events: 10,
        resync_offset: MAX_SECTOR,
        sb_csum: 0,
        dev_roles: roles,
    };
    sb.set_name_str("host:vumd");
    sb
}

#[test]
fn appendix_a_checksum_and_bytes() {
    let b = appendix_a().encode();
    assert_eq!(le32(&b, 216), 0xddde_6d37);
    assert_eq!(&b[0..8], &[0xfc, 0x4e, 0x2b, 0xa9, 1, 0, 0, 0]);
    assert_eq!(&b[0x100..0x106], &[0, 0, 1, 0, 0xff, 0xff]);
    let d = Superblock::decode(&b).unwrap();
    assert_eq!(d.sb_csum, 0xddde_6d37);
    assert_eq!(d.array_state(), "AA");
}

#[test]
fn odd_max_dev_checksum_matches_mdadm() {
    // Appendix A: max_dev 127 was accepted by mdadm with checksum dddf6d35.
    let mut sb = appendix_a();
    sb.dev_roles.truncate(127);
    let b = sb.encode();
    assert_eq!(le32(&b, 216), 0xdddf_6d35);
    Superblock::decode(&b).unwrap();
}

#[test]
fn array_state_is_bounded_by_the_role_range() {
    // Found by fuzzing: a superblock with raid_disks 0x8c8c8c8c decodes, and
    // array_state then tried to build a 2.3 GB string.
    let mut sb = appendix_a();
    sb.raid_disks = 0x8c8c_8c8c;
    let sb = Superblock::decode(&sb.encode()).unwrap();
    let state = sb.array_state();
    assert_eq!(state.len(), usize::from(role::MAX));
    assert_eq!(&state[..3], "AA.");
    // Spare (0xffff) and faulty (0xfffe) entries are never counted as slots.
    assert!(state.chars().skip(2).all(|c| c == '.'));
    let mut sb = appendix_a();
    sb.raid_disks = 3;
    sb.dev_roles[5] = 1;
    sb.dev_roles[6] = 1;
    sb.dev_roles[7] = role::FAULTY;
    assert_eq!(sb.array_state(), "A?.");
}

#[test]
fn refusals_name_the_field() {
    let good = appendix_a().encode();
    let mut b = good.clone();
    b[0] = 0;
    assert!(matches!(
        Superblock::decode(&b),
        Err(SuperblockError::Magic { .. })
    ));
    let mut b = good.clone();
    b[80] ^= 1;
    assert!(matches!(
        Superblock::decode(&b),
        Err(SuperblockError::Checksum { .. })
    ));
    assert!(matches!(
        Superblock::decode(&good[..300]),
        Err(SuperblockError::Truncated { need: 512, .. })
    ));
    let mut sb = appendix_a();
    sb.data_offset = 8;
    let e = Superblock::decode(&sb.encode()).unwrap_err();
    assert!(e.to_string().contains("data_offset"), "{e}");
    let mut sb = appendix_a();
    sb.feature_map |= 0x8000;
    let e = Superblock::decode(&sb.encode()).unwrap_err();
    assert!(e.to_string().contains("feature_map"), "{e}");
    let sb = appendix_a();
    let e = sb.check_device(8, 100_000).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    assert!(sb.check_device(8, 131_072).is_ok());
}
