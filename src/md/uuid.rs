//! 16-byte md uuids (array `set_uuid`, per-device `device_uuid`).

use std::fmt;
use std::str::FromStr;

/// A 16-byte uuid kept in on-disk byte order (md never byte-swaps uuids on v1.x).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A fresh random uuid.
    pub fn random() -> std::io::Result<Uuid> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Uuid(b))
    }

    /// mdadm's rendering: `xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx` (bytes in disk order).
    pub fn mdadm(&self) -> String {
        let mut s = String::with_capacity(35);
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 && i % 4 == 0 {
                s.push(':');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The kernel's `%pU` rendering, which names the md-cluster DLM lockspace:
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (bytes in disk order).
    pub fn lockspace_name(&self) -> String {
        let mut s = String::with_capacity(36);
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                s.push('-');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mdadm())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({})", self.mdadm())
    }
}

/// Error parsing a uuid string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a uuid: {0:?} (expected 32 hex digits, optionally separated by ':' or '-')")]
pub struct UuidParseError(pub String);

impl FromStr for Uuid {
    type Err = UuidParseError;

    /// Accepts both the mdadm and the `%pU` renderings (separators are ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = s.bytes().filter(|c| *c != b':' && *c != b'-').collect();
        if hex.len() != 32 {
            return Err(UuidParseError(s.to_string()));
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let txt = std::str::from_utf8(pair).map_err(|_| UuidParseError(s.to_string()))?;
            out[i] = u8::from_str_radix(txt, 16).map_err(|_| UuidParseError(s.to_string()))?;
        }
        Ok(Uuid(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_mdadm_and_kernel() {
        let u: Uuid = "3578507b:e0cb6d4f:6322696c:d7b1b10c".parse().unwrap();
        assert_eq!(u.0[0], 0x35);
        assert_eq!(u.0[15], 0x0c);
        assert_eq!(u.mdadm(), "3578507b:e0cb6d4f:6322696c:d7b1b10c");
        assert_eq!(u.lockspace_name(), "3578507b-e0cb-6d4f-6322-696cd7b1b10c");
        let back: Uuid = u.lockspace_name().parse().unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn rejects_garbage() {
        assert!("1234".parse::<Uuid>().is_err());
        assert!("zz78507b:e0cb6d4f:6322696c:d7b1b10c"
            .parse::<Uuid>()
            .is_err());
    }
}
