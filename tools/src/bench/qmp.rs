//! A minimal QMP client: greeting, `qmp_capabilities`, commands, with
//! asynchronous events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket never accepted.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The last error.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QMP connection closed")]
    Closed,
    /// A line was not JSON.
    #[error("QMP sent invalid JSON: {0}")]
    Json(String),
    /// A command failed.
    #[error("QMP {cmd}: {desc}")]
    Command {
        /// The command.
        cmd: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `timeout`), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let end = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        q.read()?; // greeting
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line)
            .map_err(|_| QmpError::Json(line.trim().chars().take(200).collect()))
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    cmd: cmd.into(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .into(),
                });
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}
