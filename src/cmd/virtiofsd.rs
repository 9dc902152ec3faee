//! virtiofsd's command line, translated to `vsnap fs`: every option of Rust virtiofsd 1.14 and
//! the legacy `-o` forms (what libvirt 9 passes), so `vsnap-virtiofsd` can stand wherever
//! virtiofsd ran. Each option is in [`OPTIONS`] with what vsnap does with it; the table in
//! `docs/virtiofsd.md` is generated from it (a test keeps the two equal). An option vsnap
//! cannot honour and that matters for security is refused, never ignored.

use std::ffi::OsString;

/// What vsnap does with one virtiofsd option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Does {
    /// The same as virtiofsd, under the `vsnap fs` flag given.
    Same(&'static str),
    /// Accepted; vsnap differs as the text says (printed once as a warning).
    Differs(&'static str),
    /// Accepted silently: vsnap always behaves this way.
    Always(&'static str),
    /// Refused with this reason: honouring it matters for security and vsnap cannot yet.
    Refused(&'static str),
}

/// One virtiofsd option: its long name (without `--`), whether it takes a value, and what vsnap
/// does with it.
pub struct Opt {
    pub name: &'static str,
    pub value: bool,
    pub does: Does,
}

const fn opt(name: &'static str, value: bool, does: Does) -> Opt {
    Opt { name, value, does }
}

use Does::*;

/// Every option of virtiofsd 1.14 (`virtiofsd --help`), with `-o` items after them.
pub const OPTIONS: &[Opt] = &[
    opt("shared-dir", true, Same("--shared-dir")),
    opt("tag", true, Same("--tag")),
    opt("socket-path", true, Same("--socket-path")),
    opt("socket", true, Same("--socket-path")),
    opt("fd", true, Same("--fd")),
    opt("socket-group", true, Same("--socket-group")),
    opt("thread-pool-size", true, Same("--thread-pool-size")),
    opt("cache", true, Same("--cache")),
    opt("xattr", false, Same("--xattr")),
    opt("writeback", false, Same("--writeback")),
    opt("allow-direct-io", false, Same("--allow-direct-io")),
    opt("readonly", false, Same("--readonly")),
    opt("sandbox", true, Same("--sandbox")),
    opt("seccomp", true, Same("--seccomp")),
    opt("modcaps", true, Same("--modcaps")),
    opt("rlimit-nofile", true, Same("--rlimit-nofile")),
    opt("killpriv-v2", false, Same("--killpriv-v2")),
    opt("no-killpriv-v2", false, Same("--no-killpriv-v2")),
    opt("log-level", true, Same("--log-level")),
    opt("syslog", false, Same("--syslog")),
    opt(
        "announce-submounts",
        false,
        Always("mounts below the share are always served: their inodes are held by fd"),
    ),
    opt(
        "no-announce-submounts",
        false,
        Differs("submounts are not announced to the guest; their inodes are held by fd"),
    ),
    opt(
        "inode-file-handles",
        true,
        Differs("directories are held by file handle whenever the daemon may open handles; --modcaps=-dac_read_search holds them by fd"),
    ),
    opt(
        "allow-mmap",
        false,
        Differs("no DAX window: the guest maps files through its page cache"),
    ),
    opt(
        "preserve-noatime",
        false,
        Differs("files are never opened with O_NOATIME for the guest"),
    ),
    opt(
        "migration-mode",
        true,
        Differs("live migration of the daemon's state is not supported"),
    ),
    opt(
        "migration-on-error",
        true,
        Differs("live migration of the daemon's state is not supported"),
    ),
    opt(
        "migration-verify-handles",
        false,
        Differs("live migration of the daemon's state is not supported"),
    ),
    opt(
        "migration-confirm-paths",
        false,
        Differs("live migration of the daemon's state is not supported"),
    ),
    opt(
        "posix-acl",
        false,
        Refused("POSIX ACLs are not negotiated: the guest kernel would not enforce them"),
    ),
    opt(
        "security-label",
        false,
        Refused("security labels of new files are not passed through"),
    ),
    opt(
        "xattrmap",
        true,
        Refused("xattr name mapping is not implemented"),
    ),
    opt(
        "translate-uid",
        true,
        Refused("uid translation is not implemented: files would get the guest's raw ids"),
    ),
    opt(
        "translate-gid",
        true,
        Refused("gid translation is not implemented: files would get the guest's raw ids"),
    ),
    opt(
        "uid-map",
        true,
        Refused("user namespaces with id maps are not used (see --sandbox)"),
    ),
    opt(
        "gid-map",
        true,
        Refused("user namespaces with id maps are not used (see --sandbox)"),
    ),
];

/// The `-o` items of the legacy command line (C virtiofsd, libvirt before `separate-options`).
pub const O_ITEMS: &[Opt] = &[
    opt("source", true, Same("--shared-dir")),
    opt("cache", true, Same("--cache")),
    opt("sandbox", true, Same("--sandbox")),
    opt("modcaps", true, Same("--modcaps")),
    opt("log_level", true, Same("--log-level")),
    opt("xattr", false, Same("--xattr")),
    opt(
        "no_xattr",
        false,
        Always("extended attributes are off unless asked for"),
    ),
    opt("writeback", false, Same("--writeback")),
    opt(
        "no_writeback",
        false,
        Always("the guest's writeback cache is off unless asked for"),
    ),
    opt("allow_direct_io", false, Same("--allow-direct-io")),
    opt(
        "no_allow_direct_io",
        false,
        Always("O_DIRECT is dropped unless asked for"),
    ),
    opt("readdirplus", false, Always("READDIRPLUS is offered")),
    opt("no_readdirplus", false, Same("--no-readdirplus")),
    opt("killpriv_v2", false, Same("--killpriv-v2")),
    opt("no_killpriv_v2", false, Same("--no-killpriv-v2")),
    opt(
        "announce_submounts",
        false,
        Always("mounts below the share are always served"),
    ),
    opt(
        "flock",
        false,
        Differs("flock(2) locks are handled by the guest kernel alone (FUSE locks answer ENOSYS)"),
    ),
    opt("no_flock", false, Always("FUSE locks answer ENOSYS")),
    opt(
        "posix_lock",
        false,
        Differs("POSIX locks are handled by the guest kernel alone (FUSE locks answer ENOSYS)"),
    ),
    opt("no_posix_lock", false, Always("FUSE locks answer ENOSYS")),
    opt(
        "timeout",
        true,
        Differs("the cache timeouts follow --cache"),
    ),
    opt(
        "xattrmap",
        true,
        Refused("xattr name mapping is not implemented"),
    ),
];

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Run `vsnap fs` with these arguments, after printing the warnings.
    Serve {
        args: Vec<OsString>,
        warnings: Vec<String>,
    },
    PrintCapabilities,
    Version,
    Help,
}

/// The `--print-capabilities` JSON of the vhost-user "Backend program conventions". No
/// `separate-options`: libvirt then uses the `-o` form, which also carries its lock options.
pub const CAPABILITIES: &str = "{\n  \"type\": \"fs\",\n  \"features\": []\n}";

fn find<'a>(table: &'a [Opt], name: &str) -> Option<&'a Opt> {
    table.iter().find(|o| o.name == name)
}

/// Splits a `-o` list on commas; `,,` is a literal comma (how libvirt escapes paths).
fn split_o(list: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            }
            ',' => items.push(String::new()),
            c => items.last_mut().expect("never empty").push(c),
        }
    }
    items.retain(|i| !i.is_empty());
    items
}

/// Applies one option (from `OPTIONS` or `O_ITEMS`) with its value.
fn apply(
    o: &Opt,
    shown: &str,
    value: Option<String>,
    args: &mut Vec<OsString>,
    warnings: &mut Vec<String>,
    log_level: &mut Option<String>,
) -> Result<(), String> {
    let value = match (o.value, value) {
        (true, Some(v)) => Some(v),
        (true, None) => return Err(format!("{shown} needs a value")),
        (false, None) => None,
        (false, Some(_)) => return Err(format!("{shown} takes no value")),
    };
    match o.does {
        // Given once, at the end: `-d` and the `-o` form set it too, and the last one counts.
        Same("--log-level") => {
            // C virtiofsd's `err`.
            *log_level = value.map(|v| if v == "err" { "error".into() } else { v });
        }
        Same(flag) => {
            args.push(flag.into());
            if let Some(v) = value {
                // virtiofsd's `none` is vsnap's `never`.
                let v = if flag == "--cache" && v == "none" {
                    "never".to_string()
                } else {
                    v
                };
                args.push(v.into());
            }
        }
        Differs(what) => warnings.push(format!("{shown}: accepted; {what}")),
        Always(_) => {}
        Refused(why) => return Err(format!("{shown} is not supported: {why}")),
    }
    Ok(())
}

/// Translates virtiofsd's arguments (without the program name).
pub fn translate(argv: impl IntoIterator<Item = OsString>) -> Result<Plan, String> {
    let mut args = Vec::new();
    let mut warnings = Vec::new();
    let mut log_level = None;
    let mut it = argv.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--print-capabilities" => return Ok(Plan::PrintCapabilities),
            "-V" | "--version" => return Ok(Plan::Version),
            "-h" | "--help" => return Ok(Plan::Help),
            // C virtiofsd's foreground and debug flags.
            "-f" | "--foreground" => continue,
            "-d" | "--debug" => {
                log_level = Some("debug".into());
                continue;
            }
            "-o" => {
                let list = it.next().ok_or("-o needs a value")?;
                for item in split_o(&list) {
                    let (name, value) = match item.split_once('=') {
                        Some((n, v)) => (n.to_string(), Some(v.to_string())),
                        None => (item.clone(), None),
                    };
                    let o = find(O_ITEMS, &name).ok_or(format!("-o {name}: unknown option"))?;
                    let shown = format!("-o {name}");
                    apply(o, &shown, value, &mut args, &mut warnings, &mut log_level)?;
                }
                continue;
            }
            _ => {}
        }
        let Some(long) = a.strip_prefix("--") else {
            return Err(format!("{a}: unexpected argument"));
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        let o = find(OPTIONS, name).ok_or(format!("--{name}: unknown option"))?;
        let value = match (o.value, inline) {
            (true, None) if name == "inode-file-handles" => Some("prefer".to_string()),
            (true, None) => Some(it.next().ok_or(format!("--{name} needs a value"))?),
            (_, v) => v,
        };
        apply(
            o,
            &format!("--{name}"),
            value,
            &mut args,
            &mut warnings,
            &mut log_level,
        )?;
    }
    if let Some(level) = log_level {
        args.push("--log-level".into());
        args.push(level.into());
    }
    Ok(Plan::Serve { args, warnings })
}

/// The Markdown table of [`OPTIONS`] and [`O_ITEMS`] (docs/virtiofsd.md carries it).
pub fn options_table() -> String {
    let mut t = String::from("| virtiofsd option | vsnap |\n|---|---|\n");
    let rows = OPTIONS
        .iter()
        .map(|o| (format!("`--{}`", o.name), o))
        .chain(O_ITEMS.iter().map(|o| (format!("`-o {}`", o.name), o)));
    for (shown, o) in rows {
        let what = match o.does {
            Same(flag) => format!("the same (`vsnap fs {flag}`)"),
            Differs(w) => format!("accepted with a warning: {w}"),
            Always(w) => format!("accepted: {w}"),
            Refused(w) => format!("**refused**: {w}"),
        };
        t.push_str(&format!("| {shown} | {what} |\n"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        translate(args.iter().map(OsString::from))
    }

    fn serve(args: &[&str]) -> (Vec<String>, Vec<String>) {
        match plan(args).unwrap() {
            Plan::Serve { args, warnings } => (
                args.into_iter().map(|a| a.into_string().unwrap()).collect(),
                warnings,
            ),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn what_libvirt_9_passes() {
        let (args, warnings) = serve(&[
            "--fd=31",
            "-o",
            "source=/srv/a,,b,cache=always,xattr,flock,posix_lock,sandbox=chroot",
            "--thread-pool-size=4",
        ]);
        assert_eq!(
            args,
            [
                "--fd",
                "31",
                "--shared-dir",
                "/srv/a,b",
                "--cache",
                "always",
                "--xattr",
                "--sandbox",
                "chroot",
                "--thread-pool-size",
                "4"
            ]
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let (args, _) = serve(&["--fd=3", "-o", "source=/s,cache=none,no_xattr,no_flock"]);
        assert_eq!(
            args,
            ["--fd", "3", "--shared-dir", "/s", "--cache", "never"]
        );
    }

    #[test]
    fn the_separate_style_and_its_values() {
        let (args, warnings) = serve(&[
            "--socket-path",
            "/run/fs.sock",
            "--shared-dir=/srv",
            "--seccomp=kill",
            "--modcaps=-mknod",
            "--readonly",
            "--inode-file-handles",
            "--log-level",
            "trace",
            "--syslog",
            "--announce-submounts",
        ]);
        assert_eq!(
            args,
            [
                "--socket-path",
                "/run/fs.sock",
                "--shared-dir",
                "/srv",
                "--seccomp",
                "kill",
                "--modcaps",
                "-mknod",
                "--readonly",
                "--syslog",
                "--log-level",
                "trace"
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // The last of -d, --log-level and -o log_level counts, and is passed on once.
        assert_eq!(serve(&["-d"]).0, ["--log-level", "debug"]);
        assert_eq!(
            serve(&["--log-level=warn", "-d", "-o", "log_level=err"]).0,
            ["--log-level", "error"]
        );
    }

    #[test]
    fn security_relevant_options_are_refused_not_ignored() {
        for o in OPTIONS.iter().chain(O_ITEMS) {
            if let Refused(_) = o.does {
                let a = if o.value {
                    format!("--{}=x", o.name)
                } else {
                    format!("--{}", o.name)
                };
                if find(OPTIONS, o.name).is_some() {
                    assert!(plan(&[&a]).is_err(), "{a} accepted");
                }
            }
        }
        assert!(plan(&["--uid-map=:0:1000:1:"]).is_err());
        assert!(plan(&["-o", "source=/s,xattrmap=:map::user.:"]).is_err());
        assert!(plan(&["--bogus"]).is_err());
        assert!(plan(&["-o", "bogus"]).is_err());
        assert!(plan(&["--cache"]).is_err());
        assert!(plan(&["--xattr=1"]).is_err());
        assert!(plan(&["stray"]).is_err());
    }

    #[test]
    fn early_exits() {
        assert_eq!(
            plan(&["--socket-path=x", "--print-capabilities"]),
            Ok(Plan::PrintCapabilities)
        );
        assert_eq!(plan(&["--version"]), Ok(Plan::Version));
        let caps: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(caps["type"], "fs");
    }

    #[test]
    fn the_documented_table_is_the_code() {
        let doc = include_str!("../../docs/virtiofsd.md");
        let table = options_table();
        assert!(
            doc.contains(&table),
            "docs/virtiofsd.md is out of date: put this table in it\n{table}"
        );
    }
}
