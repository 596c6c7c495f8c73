//! The guest's COM1 console: a vm-superio 8250 UART whose output becomes
//! host-timestamped lines.
//!
//! Every complete line the guest prints is stamped with the host's wall clock
//! (`<unix seconds>.<microseconds> <line>`), so logs from a source and a
//! destination process on the same host can be merged and the guest-visible
//! stall of a migration measured from them. Observers see each line as it
//! completes; the VM uses one to count `FERRY TICK` and `FERRY BAD` lines.
//!
//! A line is output only once it is complete, so the bytes of the line
//! the guest is printing when the VM pauses are still in the console. They
//! belong to the device state ([`Console::save`]): a VM restored from that
//! state gets them back ([`LineSink::resume_line`]) and prints the line
//! whole when the guest finishes it, while the VM it was moved from never
//! prints them. So a line that straddles a move is neither cut nor doubled.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORTS: u16 = 8;
/// GSI of COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Longest line kept; longer output is split so a runaway guest cannot grow
/// it. A partial line is therefore always shorter than this.
pub const MAX_LINE: usize = 4096;

/// Errors from the console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The UART could not raise its interrupt.
    #[error("serial interrupt failed: {0}")]
    Interrupt(String),
    /// Creating the interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A saved UART state is malformed.
    #[error("serial state is malformed: {0}")]
    BadState(String),
}

/// A line the guest printed, with the host time it completed.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Host wall-clock time, microseconds since the Unix epoch.
    pub host_us: u64,
    /// The text, without the newline.
    pub text: String,
}

/// Something that wants to see every console line.
pub type LineObserver = Box<dyn FnMut(&ConsoleLine) + Send>;

/// Host wall-clock time in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Collects UART output bytes into timestamped lines.
pub struct LineSink {
    out: Box<dyn Write + Send>,
    partial: Vec<u8>,
    observers: Vec<LineObserver>,
}

impl LineSink {
    /// Lines go to `out` as `<secs>.<micros> <text>\n`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            partial: Vec::new(),
            observers: Vec::new(),
        }
    }

    /// Adds an observer called for each completed line.
    pub fn observe(&mut self, observer: LineObserver) {
        self.observers.push(observer);
    }

    /// The bytes of the line being printed, not yet output.
    pub fn partial_line(&self) -> &[u8] {
        &self.partial
    }

    /// Continues a line another console had begun (its
    /// [`Self::partial_line`], e.g. from a saved state): the guest's next
    /// bytes complete it. At most [`MAX_LINE`]` - 1` bytes are taken, and
    /// line ends are dropped, as [`Write::write`] would have done.
    pub fn resume_line(&mut self, partial: &[u8]) {
        self.partial = partial
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'\n' | b'\r'))
            .take(MAX_LINE - 1)
            .collect();
    }

    fn finish_line(&mut self) {
        let line = ConsoleLine {
            host_us: now_us(),
            text: String::from_utf8_lossy(&self.partial).into_owned(),
        };
        self.partial.clear();
        // Console output is best effort: a full disk must not stop the guest.
        let _ = writeln!(
            self.out,
            "{}.{:06} {}",
            line.host_us / 1_000_000,
            line.host_us % 1_000_000,
            line.text
        );
        let _ = self.out.flush();
        for o in &mut self.observers {
            o(&line);
        }
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' => self.finish_line(),
                b'\r' => {}
                _ => {
                    self.partial.push(b);
                    if self.partial.len() >= MAX_LINE {
                        self.finish_line();
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Raises the UART's interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as seen by the vCPU threads.
pub struct Console {
    uart: Mutex<Serial<IrqTrigger, NoEvents, LineSink>>,
}

impl Console {
    /// A fresh UART writing to `sink`, raising interrupts on `irq`.
    pub fn new(irq: EventFd, sink: LineSink) -> Arc<Self> {
        Arc::new(Self {
            uart: Mutex::new(Serial::new(IrqTrigger(irq), sink)),
        })
    }

    /// A UART restored from `state`.
    pub fn from_state(
        irq: EventFd,
        sink: LineSink,
        state: &SerialState,
    ) -> Result<Arc<Self>, ConsoleError> {
        let uart = Serial::from_state(state, IrqTrigger(irq), NoEvents, sink)
            .map_err(|e| ConsoleError::BadState(format!("{e:?}")))?;
        Ok(Arc::new(Self {
            uart: Mutex::new(uart),
        }))
    }

    /// True when `port` belongs to this UART.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest `out` to one of the UART's ports.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), ConsoleError> {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        // The 8250's registers are byte-wide; wider accesses use byte 0.
        if let Some(&b) = data.first() {
            uart.write((port - COM1_BASE) as u8, b)
                .map_err(|e| ConsoleError::Interrupt(format!("{e:?}")))?;
        }
        Ok(())
    }

    /// A guest `in` from one of the UART's ports.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = data.first_mut() {
            *first = uart.read((port - COM1_BASE) as u8);
        }
    }

    /// The UART's registers, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    /// The UART's registers and the bytes of the line it has not output
    /// yet, taken together: the console's part of a saved state.
    pub fn save(&self) -> (SerialState, Vec<u8>) {
        let uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        (uart.state(), uart.writer().partial_line().to_vec())
    }

    /// Flushes the output (used when the VM stops). A partial line stays
    /// unwritten: it is output when complete, or goes with a saved state.
    pub fn flush(&self) {
        let _ = self
            .uart
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writer_mut()
            .flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_stamped_and_observed() {
        let out = Shared::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut sink = LineSink::new(Box::new(out.clone()));
        let s2 = seen.clone();
        sink.observe(Box::new(move |l| s2.lock().unwrap().push(l.text.clone())));
        sink.write_all(b"FERRY TICK 0 1 2\r\nhalf").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["FERRY TICK 0 1 2".to_string()]);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let (stamp, rest) = text.trim_end().split_once(' ').unwrap();
        assert!(stamp.contains('.') && stamp.len() > 10, "{stamp}");
        assert_eq!(rest, "FERRY TICK 0 1 2");
    }

    #[test]
    fn a_partial_line_moves_with_the_saved_state() {
        let (a, b) = (Shared::default(), Shared::default());
        let src = Console::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
            LineSink::new(Box::new(a.clone())),
        );
        for c in b"one\nFERRY TI" {
            src.pio_write(COM1_BASE, &[*c]).unwrap();
        }
        let (serial, line) = src.save();
        assert_eq!(line, b"FERRY TI");
        let mut sink = LineSink::new(Box::new(b.clone()));
        sink.resume_line(&line);
        let dst = Console::from_state(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
            sink,
            &serial,
        )
        .unwrap();
        for c in b"CK 0 1\n" {
            dst.pio_write(COM1_BASE, &[*c]).unwrap();
        }
        // The source never outputs the moved bytes, not even when dropped.
        src.flush();
        drop(src);
        let text = |s: &Shared| String::from_utf8(s.0.lock().unwrap().clone()).unwrap();
        assert!(text(&a).ends_with(" one\n"), "{:?}", text(&a));
        assert!(text(&b).ends_with(" FERRY TICK 0 1\n"), "{:?}", text(&b));
        assert_eq!(text(&b).lines().count(), 1);
    }

    #[test]
    fn a_resumed_line_is_bounded_and_has_no_line_end() {
        let mut sink = LineSink::new(Box::new(Shared::default()));
        sink.resume_line(&[b'x'; 3 * MAX_LINE]);
        assert_eq!(sink.partial_line().len(), MAX_LINE - 1);
        sink.resume_line(b"a\nb\rc");
        assert_eq!(sink.partial_line(), b"abc");
    }

    #[test]
    fn uart_output_reaches_the_sink() {
        let out = Shared::default();
        let con = Console::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
            LineSink::new(Box::new(out.clone())),
        );
        for b in b"hi\n" {
            con.pio_write(COM1_BASE, &[*b]).unwrap();
        }
        assert!(String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .ends_with(" hi\n"));
    }
}
