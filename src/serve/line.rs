//! Reads one request line from a client that may be slow, silent or endless: the
//! whole line must arrive before a deadline and fit a byte limit, and nothing past
//! the limit is kept.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Why no request line was read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The client sent more than the limit without a newline.
    #[error("request longer than {0} bytes")]
    TooLong(usize),
    /// The line did not arrive in time.
    #[error("no complete request within {0:?}")]
    TimedOut(Duration),
    /// The client closed the connection before the end of the line.
    #[error("connection closed before the end of the request")]
    Closed,
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads from `conn` up to the first newline (returned without it) within `timeout`
/// in all, refusing lines of more than `limit` bytes. Bytes after the newline are
/// dropped: a connection carries one request.
pub fn read_line(conn: &UnixStream, limit: usize, timeout: Duration) -> Result<Vec<u8>, LineError> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LineError::TimedOut(timeout));
        }
        conn.set_read_timeout(Some(left))?;
        let n = match (&mut &*conn).read(&mut buf) {
            Ok(0) => return Err(LineError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(LineError::TimedOut(timeout))
            }
            Err(e) => return Err(e.into()),
        };
        let got = &buf[..n];
        let end = got.iter().position(|&b| b == b'\n');
        let take = end.unwrap_or(n);
        if line.len() + take > limit {
            return Err(LineError::TooLong(limit));
        }
        line.extend_from_slice(&got[..take]);
        if end.is_some() {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn a_line_is_read_up_to_its_newline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"op\":\"status\"}\nrest").unwrap();
        assert_eq!(read_line(&a, 64, T).unwrap(), b"{\"op\":\"status\"}");
    }

    #[test]
    fn a_line_may_arrive_in_pieces() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            for piece in [&b"ab"[..], b"cd", b"e\n"] {
                b.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        assert_eq!(read_line(&a, 64, T).unwrap(), b"abcde");
        w.join().unwrap();
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_accepted_and_one_more_byte_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'x'; 10]).unwrap();
        b.write_all(b"\n").unwrap();
        assert_eq!(read_line(&a, 10, T).unwrap().len(), 10);
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'x'; 11]).unwrap();
        assert!(matches!(read_line(&a, 10, T), Err(LineError::TooLong(10))));
    }

    #[test]
    fn a_trickle_ends_at_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            for _ in 0..20 {
                if (&b).write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let r = read_line(&a, 1024, Duration::from_millis(300));
        assert!(matches!(r, Err(LineError::TimedOut(_))), "{r:?}");
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        drop(a);
        w.join().unwrap();
    }

    #[test]
    fn a_close_before_the_newline_is_reported() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"op\"").unwrap();
        drop(b);
        assert!(matches!(read_line(&a, 64, T), Err(LineError::Closed)));
    }
}
