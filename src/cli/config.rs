//! `serve --config FILE`: a disk's options in a TOML file (what a systemd unit
//! instance reads from `/etc/vhost-user-md/NAME.conf`).
//!
//! The keys are `serve`'s long options without their dashes, `legs` is the list of
//! legs, a flag takes `true` or `false`:
//!
//! ```toml
//! socket = "/run/vhost-user-md/disk1.sock"
//! legs = ["/dev/mapper/lunA", "/dev/mapper/lunB"]
//! queues = 4
//! lock-manager = "dlm"
//! socket-owner = "libvirt-qemu"
//! metrics = "127.0.0.1:9710"
//! read-only = false
//! ```
//!
//! The file becomes command-line flags placed before the command line's own, so
//! clap checks them all together; each value is first checked with its option's
//! own parser, so a mistake is one line naming the file, its line and the key.

use clap::builder::Command;
use std::ffi::OsString;
use toml::Spanned;

/// The key that lists the legs (`serve`'s positional arguments).
const LEGS: &str = "legs";

/// Options a file may not set: the file itself, fault drills, and what is for one
/// start only (a file is read again at every restart of a unit: `force` would
/// skip the multi-host check for good, `create-size` would make image files where
/// a missing device node should be).
const NOT_IN_FILE: &[&str] = &["config", "help", "force", "create-size", "cluster-name"];

/// Options whose value must be a string in the file: an unquoted `0660` is the
/// TOML integer 660, which is not the mode meant.
const QUOTED: &[&str] = &["socket-mode"];

/// Whether a file may set `arg`.
fn settable(arg: &clap::Arg) -> bool {
    !arg.is_hide_set() && arg.get_long().is_some_and(|l| !NOT_IN_FILE.contains(&l))
}

/// `args` (a whole command line, program name first) with the `--config FILE` of a
/// `serve` command replaced by the file's options (each `--key=value`), then the
/// command line's own, whose options win over the file's; other command lines are
/// returned unchanged. The result parses without the file: a restart that
/// executes the program anew with it (see `serve::rejoin`) gets the options this
/// run got, whatever the file says by then.
pub fn expand(args: Vec<OsString>, cli: &Command) -> Result<Vec<OsString>, String> {
    if args.get(1).is_none_or(|a| a != "serve") {
        return Ok(args);
    }
    let Some((path, rest)) = take_config(&args[2..]) else {
        return Ok(args);
    };
    let serve = cli
        .find_subcommand("serve")
        .ok_or("the command line has no serve command")?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("config {}: cannot read: {e}", path.display()))?;
    let given = long_options(&rest);
    let (flags, legs) =
        flags_of(&text, serve, &given).map_err(|e| format!("config {}: {e}", path.display()))?;
    let mut out = Vec::with_capacity(args.len() + flags.len() + legs.len() + 1);
    out.extend(args[..2].iter().cloned());
    out.extend(flags);
    if !legs.is_empty() && has_positional(&rest, serve) {
        return Err(format!(
            "config {}: legs are given in the file and on the command line; give them in one place",
            path.display()
        ));
    }
    let ends_options = rest.iter().any(|a| a == "--");
    out.extend(rest);
    if !legs.is_empty() {
        if !ends_options {
            out.push("--".into());
        }
        out.extend(legs);
    }
    Ok(out)
}

/// The long options (without dashes) `args` give before a `--`.
fn long_options(args: &[OsString]) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            out.push(long.split('=').next().unwrap_or(long).to_string());
        }
    }
    out
}

/// The FILE of `--config FILE` or `--config=FILE` among `serve`'s arguments, and
/// those arguments without it.
fn take_config(args: &[OsString]) -> Option<(std::path::PathBuf, Vec<OsString>)> {
    let mut rest = Vec::with_capacity(args.len());
    let mut path = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            rest.push(a.clone());
            rest.extend(it.cloned());
            break;
        }
        if path.is_none() && a == "--config" {
            path = Some(it.next()?.into());
        } else if let Some(p) = a
            .to_str()
            .and_then(|s| s.strip_prefix("--config="))
            .filter(|_| path.is_none())
        {
            path = Some(p.into());
        } else {
            rest.push(a.clone());
        }
    }
    path.map(|p| (p, rest))
}

/// Whether `args` (after `serve`) hold a positional argument: a leg.
fn has_positional(args: &[OsString], serve: &Command) -> bool {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { return true };
        if s == "--" {
            return it.next().is_some();
        }
        if let Some(long) = s.strip_prefix("--") {
            if long.contains('=') {
                continue;
            }
            let takes_value = serve
                .get_arguments()
                .find(|x| x.get_long() == Some(long))
                .is_some_and(|x| x.get_action().takes_values());
            if takes_value {
                it.next();
            }
        } else if !s.starts_with('-') {
            return true;
        }
    }
    false
}

/// The flags and legs a config file's text gives, each value checked by its
/// option's parser; `Err` names the line and the key.
fn flags_of(
    text: &str,
    serve: &Command,
    given: &[String],
) -> Result<(Vec<OsString>, Vec<OsString>), String> {
    let table: std::collections::BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    // `serve` with nothing required: checks one option's value alone.
    let lenient = serve.clone().mut_args(|a| a.required(false));
    let mut flags = Vec::new();
    let mut legs = Vec::new();
    // In the order of the file: the first mistake is the one reported.
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let at = format!("line {}", line_of(text, key.span().start));
        let name = key.get_ref().as_str();
        if name == LEGS {
            let list = match value.get_ref() {
                toml::Value::Array(a) => a,
                _ => {
                    return Err(format!(
                        "{at}: {LEGS} takes a list of paths, e.g. [\"/dev/sdb\", \"/dev/sdc\"]"
                    ))
                }
            };
            for leg in list {
                match leg {
                    toml::Value::String(s) if !s.is_empty() => legs.push(OsString::from(s)),
                    _ => return Err(format!("{at}: {LEGS}: every leg is a path in quotes")),
                }
            }
            if legs.len() < 2 {
                return Err(format!("{at}: {LEGS}: give two or more legs"));
            }
            continue;
        }
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(name) && settable(a))
            .ok_or_else(|| {
                format!(
                    "{at}: unknown key \"{name}\"; the keys are {LEGS} and serve's options: {}",
                    keys(serve).join(", ")
                )
            })?;
        if given.iter().any(|g| g == name) {
            // The command line sets it (e.g. a unit's drop-in): the file's gives way.
            continue;
        }
        if QUOTED.contains(&name) && !value.get_ref().is_str() {
            return Err(format!(
                "{at}: {name}: give it in quotes, e.g. {name} = \"0660\""
            ));
        }
        if !arg.get_action().takes_values() {
            match value.get_ref() {
                toml::Value::Boolean(true) => flags.push(OsString::from(format!("--{name}"))),
                toml::Value::Boolean(false) => {}
                _ => return Err(format!("{at}: {name} takes true or false")),
            }
            continue;
        }
        let values: Vec<String> = match value.get_ref() {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(n) => vec![n.to_string()],
            toml::Value::Array(a) if arg.get_num_args().is_some_and(|n| n.max_values() > 1) => a
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(n) => Ok(n.to_string()),
                    _ => Err(format!("{at}: {name}: give strings or numbers")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("{at}: {name} takes a value in quotes or a number")),
        };
        for v in values {
            // One token: a value that starts with a dash is not taken for an option.
            let flag = format!("--{name}={v}");
            check_value(&lenient, &flag).map_err(|why| format!("{at}: {name}: {why}"))?;
            flags.push(OsString::from(flag));
        }
    }
    Ok((flags, legs))
}

/// Checks the value of `--name=value` with its option's parser (the whole command line is
/// checked later: what one option requires of another, repeats).
fn check_value(lenient: &Command, flag: &str) -> Result<(), String> {
    use clap::error::ErrorKind;
    match lenient.clone().try_get_matches_from(["serve", flag]) {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
            ) =>
        {
            Err(clap_reason(&e))
        }
        _ => Ok(()),
    }
}

/// The keys a file may set, for the message about an unknown one.
fn keys(serve: &Command) -> Vec<&str> {
    serve
        .get_arguments()
        .filter(|a| settable(a))
        .filter_map(|a| a.get_long())
        .collect()
}

/// One line for a TOML syntax error: where, and what.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("line {}: {msg}", line_of(text, span.start)),
        None => msg,
    }
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A value parser's complaint without clap's decorations.
fn clap_reason(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!("invalid value {v:?}"),
        _ => "invalid value".to_string(),
    };
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    // "error: invalid value 'x' for '--queues <N>': why" -> "why"
    match first.rsplit_once("': ") {
        Some((_, why)) if !why.is_empty() => format!("{value}: {why}"),
        _ => match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(v)) => format!("{value}; use one of {}", v.join(", ")),
            _ => value,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    fn cli() -> Command {
        crate::cli::Cli::command()
    }

    fn expand_text(text: &str, extra: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("disk1.conf");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let mut args: Vec<OsString> = vec!["vhost-user-md".into(), "serve".into()];
        args.push("--config".into());
        args.push(path.clone().into());
        args.extend(extra.iter().map(OsString::from));
        let file = path.to_string_lossy().into_owned();
        expand(args, &cli())
            .map(|v| {
                v.into_iter()
                    .map(|s| s.to_string_lossy().replace(&file, "FILE"))
                    .collect()
            })
            .map_err(|e| e.replace(&file, "FILE"))
    }

    #[test]
    fn a_file_becomes_flags_that_clap_parses_like_the_command_line() {
        let text = "socket = \"/run/v/d1.sock\"\nlegs = [\"/dev/vdc\", \"/dev/vdd\"]\nqueues = 4\nread-only = true\nbuffered = false\nresync-max-rate = \"50M\"\nlock-manager = \"lockd:/run/v/lockd.sock\"\n";
        let args = expand_text(text, &[]).unwrap();
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&args).unwrap();
        let crate::cli::Command::Serve(s) = cli.command else {
            panic!("not serve: {args:?}")
        };
        assert_eq!(s.socket, Path::new("/run/v/d1.sock"));
        assert_eq!(s.legs, [Path::new("/dev/vdc"), Path::new("/dev/vdd")]);
        assert_eq!(s.queues, 4);
        assert!(s.read_only);
        assert!(!s.buffered);
        assert_eq!(s.resync_max_rate, Some(50 << 20));
        assert_eq!(
            s.lock_manager,
            crate::serve::LockManager::Lockd("/run/v/lockd.sock".into())
        );
    }

    #[test]
    fn the_command_line_adds_to_the_file_and_wins_over_it() {
        let text = "socket = \"/run/v/d1.sock\"\nlegs = [\"/a\", \"/b\"]\nqueues = 4\n";
        let args = expand_text(text, &["--queues", "2", "--read-only"]).unwrap();
        assert!(!args.iter().any(|a| a.starts_with("--config")), "{args:?}");
        let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from(&args).unwrap();
        let crate::cli::Command::Serve(s) = parsed.command else {
            panic!("not serve")
        };
        assert_eq!(s.queues, 2, "the command line's --queues wins: {args:?}");
        assert!(s.read_only);
        assert_eq!(s.socket, Path::new("/run/v/d1.sock"));
        let args = expand_text(text, &["--socket=/x"]).unwrap();
        let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from(&args).unwrap();
        let crate::cli::Command::Serve(s) = parsed.command else {
            panic!("not serve")
        };
        assert_eq!(s.socket, Path::new("/x"));
        let e = expand_text(text, &["/c", "/d"]).unwrap_err();
        assert!(
            e.contains("legs are given in the file and on the command line"),
            "{e}"
        );
    }

    #[test]
    fn the_expanded_command_line_parses_alone_like_a_restart_needs() {
        // A restart executes the program again with the expanded arguments: they
        // must not name the file again, and must parse to the same options.
        let text = "socket = \"/s\"\nlegs = [\"/a\", \"/b\"]\nresync-max-rate = \"50M\"\n";
        let args = expand_text(text, &[]).unwrap();
        let again = expand(args.iter().map(OsString::from).collect(), &cli()).unwrap();
        let again: Vec<String> = again
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(again, args);
        assert!(<crate::cli::Cli as clap::Parser>::try_parse_from(&args).is_ok());
    }

    #[test]
    fn one_start_options_and_an_unquoted_mode_are_refused() {
        for key in [
            "force = true",
            "create-size = \"10G\"",
            "cluster-name = \"c\"",
        ] {
            let e = expand_text(&format!("{key}\n"), &[]).unwrap_err();
            assert!(e.contains("unknown key"), "{key}: {e}");
        }
        // 0660 unquoted is the integer 660 (and 0o660 is 432): never a mode.
        let e = expand_text("socket-mode = 0o660\n", &[]).unwrap_err();
        assert_eq!(
            e,
            "config FILE: line 1: socket-mode: give it in quotes, e.g. socket-mode = \"0660\""
        );
        let args = expand_text(
            "socket = \"/s\"\nsocket-mode = \"0660\"\nlegs = [\"/a\", \"/b\"]\n",
            &[],
        )
        .unwrap();
        let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from(&args).unwrap();
        let crate::cli::Command::Serve(s) = parsed.command else {
            panic!("not serve")
        };
        assert_eq!(s.socket_mode, 0o660);
    }

    #[test]
    fn a_value_starting_with_a_dash_is_a_value() {
        let e = expand_text("resync-max-rate = \"-5M\"\n", &[]).unwrap_err();
        assert!(
            e.starts_with("config FILE: line 1: resync-max-rate: invalid value"),
            "{e}"
        );
    }

    #[test]
    fn the_first_mistake_in_the_file_is_the_one_reported() {
        let e = expand_text("zzz = 1\naaa = 2\n", &[]).unwrap_err();
        assert!(
            e.starts_with("config FILE: line 1: unknown key \"zzz\""),
            "{e}"
        );
        let e = expand_text("legs = []\n", &[]).unwrap_err();
        assert!(e.contains("give two or more legs"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_one_line_naming_the_file_the_line_and_the_key() {
        let e =
            expand_text("socket = \"/s\"\nqueus = 2\nlegs = [\"/a\", \"/b\"]\n", &[]).unwrap_err();
        assert!(
            e.starts_with("config FILE: line 2: unknown key \"queus\""),
            "{e}"
        );
        assert!(e.contains("queues"), "the message lists the keys: {e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_bad_value_names_the_key_and_says_why() {
        let e = expand_text(
            "socket = \"/s\"\nlegs = [\"/a\", \"/b\"]\n\nqueues = 100\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.starts_with("config FILE: line 4: queues: invalid value \"100\""),
            "{e}"
        );
        assert!(e.contains("1..=64"), "{e}");
        let e = expand_text("resync-max-rate = \"fast\"\n", &[]).unwrap_err();
        assert!(
            e.starts_with("config FILE: line 1: resync-max-rate: invalid value"),
            "{e}"
        );
        let e = expand_text("read-only = \"yes\"\n", &[]).unwrap_err();
        assert_eq!(e, "config FILE: line 1: read-only takes true or false");
        let e = expand_text("legs = \"/a\"\n", &[]).unwrap_err();
        assert!(
            e.starts_with("config FILE: line 1: legs takes a list"),
            "{e}"
        );
        let e = expand_text("lock-manager = \"nfs\"\n", &[]).unwrap_err();
        assert!(
            e.contains("lock-manager") && e.contains("use local, dlm or lockd:PATH"),
            "{e}"
        );
    }

    #[test]
    fn a_syntax_error_and_a_drill_key_are_refused() {
        let e = expand_text("socket = \"/s\"\nqueues = \n", &[]).unwrap_err();
        assert!(e.starts_with("config FILE: line 2: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = expand_text("inject-fault = \"0:reads\"\n", &[]).unwrap_err();
        assert!(e.contains("unknown key \"inject-fault\""), "{e}");
        let e = expand_text("config = \"/x\"\n", &[]).unwrap_err();
        assert!(e.contains("unknown key \"config\""), "{e}");
    }

    #[test]
    fn a_missing_file_is_one_line() {
        let args = vec![
            OsString::from("vhost-user-md"),
            "serve".into(),
            "--config=/nonexistent/disk9.conf".into(),
        ];
        let e = expand(args, &cli()).unwrap_err();
        assert!(
            e.starts_with("config /nonexistent/disk9.conf: cannot read: "),
            "{e}"
        );
    }

    #[test]
    fn other_commands_and_a_serve_without_config_are_left_alone() {
        let args: Vec<OsString> = ["vhost-user-md", "status", "--config", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(args.clone(), &cli()).unwrap(), args);
        let args: Vec<OsString> = ["vhost-user-md", "serve", "--socket", "s", "a", "b"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(args.clone(), &cli()).unwrap(), args);
    }
}
