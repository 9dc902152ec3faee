//! `--log-level` and `--syslog` for the daemons (virtiofsd's names and values).
//!
//! `--syslog` sends each event as one datagram to journald's native socket when
//! `/run/systemd/journal/socket` exists, else to syslog's `/dev/log` (RFC 3164, as glibc's
//! `syslog(3)` writes it). The socket is connected once, at start-up: `vsnap fs` then enters its
//! sandbox, where neither path can be reached and `connect` is outside its seccomp allow-list,
//! and keeps logging through the connected socket with `send`. (tracing-journald names the path
//! on every send and passes large entries as a memfd, neither of which works in there.)

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
pub const SYSLOG_SOCKET: &str = "/dev/log";
/// LOG_DAEMON.
const FACILITY: u8 = 3;
/// Longer messages are cut: one datagram must fit the socket's send buffer, and syslog daemons
/// cut at 8 KiB anyway.
pub const MAX_MESSAGE: usize = 8 << 10;
/// A logger that stopped reading must not stall the daemon's queues for long.
const SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// virtiofsd's `--log-level` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The logging options of `vsnap blk` and `vsnap fs`.
#[derive(Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log level; overrides RUST_LOG [default: RUST_LOG, else info].
    #[arg(long, value_enum)]
    pub log_level: Option<LogLevel>,
    /// Log to the journal (when /run/systemd/journal/socket exists) or else to syslog (/dev/log),
    /// instead of stderr.
    #[arg(long)]
    pub syslog: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--syslog: neither journald ({JOURNAL_SOCKET}: {journal}) nor syslog ({SYSLOG_SOCKET}: {syslog}) takes messages")]
    NoSyslog {
        journal: io::Error,
        syslog: io::Error,
    },
    #[error("logging was already set up")]
    AlreadySet,
}

/// Sets up the process's logging as `args` says; RUST_LOG applies when `--log-level` is absent.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    let filter = match args.log_level {
        Some(l) => EnvFilter::new(l.directive()),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    let r = if args.syslog {
        // Neither daemon keeps time: the journal and syslog stamp each message themselves.
        fmt.with_writer(Sink::detect(&identifier())?)
            .with_ansi(false)
            .without_time()
            .try_init()
    } else {
        fmt.with_writer(io::stderr)
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .try_init()
    };
    r.map_err(|_| LogError::AlreadySet)
}

/// The program's name, as `syslog(3)` and the journal's SYSLOG_IDENTIFIER use it.
fn identifier() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "vsnap".into())
}

/// The wire format of a [`Sink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// systemd's native journal protocol: `KEY=value` fields, one entry per datagram.
    Journal,
    /// RFC 3164 as glibc writes it to `/dev/log`: `<PRI>Mmm dd hh:mm:ss ident[pid]: message`.
    Syslog,
}

/// A connected datagram socket to the journal or to syslog; a `MakeWriter` that turns each
/// formatted event into one entry.
#[derive(Debug)]
pub struct Sink {
    socket: UnixDatagram,
    protocol: Protocol,
    ident: String,
    /// Taken at start-up: in `vsnap fs`'s PID namespace the daemon is pid 1; this is the pid the
    /// host knows it by (the supervisor's).
    pid: u32,
}

impl Sink {
    /// The journal if its socket exists and takes a connection, else `/dev/log`.
    pub fn detect(ident: &str) -> Result<Sink, LogError> {
        let journal = if Path::new(JOURNAL_SOCKET).exists() {
            match Sink::connect(Path::new(JOURNAL_SOCKET), Protocol::Journal, ident) {
                Ok(s) => return Ok(s),
                Err(e) => e,
            }
        } else {
            io::Error::from(io::ErrorKind::NotFound)
        };
        Sink::connect(Path::new(SYSLOG_SOCKET), Protocol::Syslog, ident)
            .map_err(|syslog| LogError::NoSyslog { journal, syslog })
    }

    /// Connects to the datagram socket at `path`.
    pub fn connect(path: &Path, protocol: Protocol, ident: &str) -> io::Result<Sink> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Sink {
            socket,
            protocol,
            // Neither format has room for a newline in it.
            ident: ident.replace(['\n', ' ', '[', ':'], "_"),
            pid: std::process::id(),
        })
    }

    /// One entry for a formatted event (its trailing newline is dropped).
    pub fn encode(&self, level: Level, target: &str, msg: &[u8], now: SystemTime) -> Vec<u8> {
        let msg = trim(msg);
        let mut out = Vec::with_capacity(msg.len() + 128);
        match self.protocol {
            Protocol::Journal => {
                field(&mut out, "PRIORITY", severity(level).to_string().as_bytes());
                field(&mut out, "SYSLOG_FACILITY", FACILITY.to_string().as_bytes());
                field(&mut out, "SYSLOG_IDENTIFIER", self.ident.as_bytes());
                field(&mut out, "SYSLOG_PID", self.pid.to_string().as_bytes());
                if !target.is_empty() {
                    field(&mut out, "TARGET", target.as_bytes());
                }
                field(&mut out, "MESSAGE", msg);
            }
            Protocol::Syslog => {
                let pri = FACILITY * 8 + severity(level);
                let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                out.extend_from_slice(
                    format!("<{pri}>{} {}[{}]: ", timestamp(secs), self.ident, self.pid).as_bytes(),
                );
                out.extend_from_slice(msg);
            }
        }
        out
    }

    /// Sends one entry; a message that cannot be delivered is dropped (there is nowhere left
    /// to report it).
    fn send(&self, level: Level, target: &str, msg: &[u8]) {
        let entry = self.encode(level, target, msg, SystemTime::now());
        let _ = self.socket.send(&entry);
    }
}

/// syslog severity of a tracing level.
fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `msg` without its trailing newline, cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn trim(msg: &[u8]) -> &[u8] {
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    if msg.len() <= MAX_MESSAGE {
        return msg;
    }
    // Back up over UTF-8 continuation bytes (10xxxxxx).
    let mut end = MAX_MESSAGE;
    while end > 0 && msg[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    &msg[..end]
}

/// A journal field: `NAME=value`, or the length-prefixed binary form when the value has a
/// newline (systemd's JOURNAL_NATIVE_PROTOCOL).
fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// RFC 3164's `Mmm dd hh:mm:ss` for `secs` since the epoch, in UTC (a sandboxed daemon has no
/// time zone files; receivers stamp local messages with their own time anyway).
fn timestamp(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, rem) = (secs / 86400, secs % 86400);
    // Days to a civil date (H. Hinnant's algorithm), in a year starting on March 1st.
    let z = days + 719_468;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{} {day:>2} {:02}:{:02}:{:02}",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The formatted bytes of one event, sent as one entry when the formatter lets go of it.
pub struct Entry<'a> {
    sink: &'a Sink,
    level: Level,
    target: String,
    buf: Vec<u8>,
}

impl io::Write for Entry<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.send(self.level, &self.target, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Entry<'a>;

    fn make_writer(&'a self) -> Entry<'a> {
        Entry {
            sink: self,
            level: Level::INFO,
            target: String::new(),
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Entry<'a> {
        Entry {
            sink: self,
            level: *meta.level(),
            target: meta.target().to_string(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal entry as journald parses it: fields in order, either form.
    fn parse_journal(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut fields = Vec::new();
        while !b.is_empty() {
            let nl = b.iter().position(|&c| c == b'\n').expect("newline");
            let line = &b[..nl];
            if let Some(eq) = line.iter().position(|&c| c == b'=') {
                let name = String::from_utf8(line[..eq].to_vec()).unwrap();
                fields.push((name, line[eq + 1..].to_vec()));
                b = &b[nl + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let v = &b[nl + 9..nl + 9 + len];
                assert_eq!(b[nl + 9 + len], b'\n');
                fields.push((name, v.to_vec()));
                b = &b[nl + 10 + len..];
            }
        }
        fields
    }

    fn get<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
        &fields.iter().find(|(n, _)| n == name).expect(name).1
    }

    fn listener(protocol: Protocol) -> (tempfile::TempDir, UnixDatagram, Sink) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log.sock");
        let server = UnixDatagram::bind(&p).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let sink = Sink::connect(&p, protocol, "vsnap test").unwrap();
        (d, server, sink)
    }

    fn recv(server: &UnixDatagram) -> Vec<u8> {
        let mut buf = vec![0u8; 64 << 10];
        let n = server.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Events logged through a real subscriber arrive as one journal entry each.
    #[test]
    fn journal_entries_over_a_bound_socket() {
        let (_d, server, sink) = listener(Protocol::Journal);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(sink)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(queue = 3, "two\nlines");
            tracing::info!("plain");
        });
        let first = parse_journal(&recv(&server));
        assert_eq!(get(&first, "PRIORITY"), b"4");
        assert_eq!(get(&first, "SYSLOG_FACILITY"), b"3");
        assert_eq!(get(&first, "SYSLOG_IDENTIFIER"), b"vsnap_test");
        assert_eq!(
            get(&first, "SYSLOG_PID"),
            std::process::id().to_string().as_bytes()
        );
        assert_eq!(get(&first, "TARGET"), module_path!().as_bytes());
        let msg = String::from_utf8(get(&first, "MESSAGE").to_vec()).unwrap();
        assert!(
            msg.contains("two\nlines") && msg.contains("queue=3"),
            "{msg:?}"
        );
        assert!(!msg.ends_with('\n'), "{msg:?}");
        let second = parse_journal(&recv(&server));
        assert_eq!(get(&second, "PRIORITY"), b"6");
        assert!(get(&second, "MESSAGE").ends_with(b"plain"));
    }

    #[test]
    fn syslog_lines_over_a_bound_socket() {
        let (_d, server, sink) = listener(Protocol::Syslog);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(sink)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::error!("it broke"));
        let line = String::from_utf8(recv(&server)).unwrap();
        // <daemon.err>, a timestamp, ident[pid]: and the formatted event.
        let rest = line.strip_prefix("<27>").expect(&line);
        let (stamp, rest) = rest.split_at(15);
        assert_eq!(stamp.as_bytes()[3], b' ', "{line}");
        assert_eq!(stamp.as_bytes()[9], b':', "{line}");
        let head = format!(" vsnap_test[{}]: ", std::process::id());
        let msg = rest.strip_prefix(&head).expect(&line);
        assert!(msg.contains("ERROR") && msg.ends_with("it broke"), "{line}");
    }

    #[test]
    fn timestamps_and_cuts() {
        assert_eq!(timestamp(0), "Jan  1 00:00:00");
        // 2024-02-29 23:59:59 UTC (a leap day).
        assert_eq!(timestamp(1_709_251_199), "Feb 29 23:59:59");
        // 2025-12-31 12:34:56 UTC.
        assert_eq!(timestamp(1_767_184_496), "Dec 31 12:34:56");
        let long = "é".repeat(MAX_MESSAGE);
        let cut = trim(long.as_bytes());
        assert!(cut.len() <= MAX_MESSAGE && std::str::from_utf8(cut).is_ok());
        assert_eq!(trim(b"a\n"), b"a");
        let mut out = Vec::new();
        field(&mut out, "A", b"x=y");
        assert_eq!(out, b"A=x=y\n");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(Sink::connect(&d.path().join("none"), Protocol::Syslog, "x").is_err());
    }
}
