//! Renderings shared with `mdadm -E` / `-X`, so operators can compare outputs.

/// mdadm's `human_size`: "" below 5000 KiB, else " (x.yy MiB x.yy MB)" (GiB/GB from
/// 2 GiB, TiB/TB from 2 TiB), rounded to hundredths the way mdadm rounds.
pub fn human_size(bytes: u64) -> String {
    let b = u128::from(bytes);
    // Hundredths of a binary and of a decimal unit, rounded half up like mdadm.
    let pair = |bin: u128, dec: u128, bs: &str, ds: &str| {
        let cb = (b * 200 / bin).div_ceil(2);
        let cd = (b / (dec / 200)).div_ceil(2);
        format!(
            " ({}.{:02} {bs} {}.{:02} {ds})",
            cb / 100,
            cb % 100,
            cd / 100,
            cd % 100
        )
    };
    if bytes < 5000 * 1024 {
        String::new()
    } else if bytes < 2 << 30 {
        pair(1 << 20, 1_000_000, "MiB", "MB")
    } else if bytes < 2 << 40 {
        pair(1 << 30, 1_000_000_000, "GiB", "GB")
    } else {
        pair(1 << 40, 1_000_000_000_000, "TiB", "TB")
    }
}

/// mdadm's bitmap chunk rendering: the largest 1024-unit that divides down, e.g. "64 MB".
pub fn human_chunksize(bytes: u32) -> String {
    let suffixes = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes;
    let mut i = 0;
    while v >> 10 != 0 && i + 1 < suffixes.len() {
        v >>= 10;
        i += 1;
    }
    format!("{v} {}", suffixes[i])
}

/// Percentage with one decimal as mdadm prints dirty bits ("6.3", "100.0").
pub fn percent(part: u64, whole: u64) -> String {
    format!("{:.1}", 100.0 * part as f64 / whole.max(1) as f64)
}

/// `ctime(3)`-style rendering in UTC: "Wed Nov 25 17:57:39 2026".
pub fn ctime_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // 1970-01-01 was a Thursday.
    let wday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let (y, mo, d) = civil_from_days(days);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{wday} {mon} {d:>2} {h:02}:{m:02}:{s:02} {y}")
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_119), (2025, 1, 31));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn sizes_like_mdadm() {
        assert_eq!(human_size(129_024 * 512), " (63.00 MiB 66.06 MB)");
        assert_eq!(human_size(4096), "");
        assert_eq!(human_size(10 << 30), " (10.00 GiB 10.74 GB)");
        assert_eq!(human_size(3 << 40), " (3.00 TiB 3.30 TB)");
    }

    #[test]
    fn chunks_like_mdadm() {
        assert_eq!(human_chunksize(64 << 20), "64 MB");
        assert_eq!(human_chunksize(1 << 20), "1 MB");
        assert_eq!(human_chunksize(4096), "4 KB");
        assert_eq!(human_chunksize(1536), "1 KB");
        assert_eq!(percent(4, 63), "6.3");
        assert_eq!(percent(0, 0), "0.0");
    }

    #[test]
    fn ctime_in_utc() {
        assert_eq!(ctime_utc(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ctime_utc(1_700_000_000), "Tue Nov 14 22:13:20 2023");
        assert_eq!(ctime_utc(951_782_400), "Tue Feb 29 00:00:00 2000");
    }
}
