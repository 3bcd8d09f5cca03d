use std::io::Write;
use std::process::ExitCode;

/// Whether standard error is the journal's stream (`JOURNAL_STREAM` names its
/// device and inode; a child that inherited the variable but writes elsewhere is not).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

fn main() -> ExitCode {
    let mut log =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if stderr_is_journal() {
        // The journal stamps every line itself and takes its priority from a
        // syslog prefix (so `journalctl -p warning` finds the warnings).
        log.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}: {}", record.target(), record.args())
        });
    } else {
        log.format_timestamp_millis();
    }
    log.init();
    vhost_user_md::cli::main()
}
