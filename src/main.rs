use std::process::ExitCode;

fn main() -> ExitCode {
    let mut log =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Under systemd the journal stamps every line itself.
        log.format_timestamp(None);
    } else {
        log.format_timestamp_millis();
    }
    log.init();
    vhost_user_md::cli::main()
}
