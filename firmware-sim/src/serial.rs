//! A serial device played on a pseudo-terminal, so the agent reads it exactly as it would read
//! `/dev/ttyUSB0`.
//!
//! We open the pty pair ourselves (`openpty`), put the device side in raw mode (no `\r`
//! translation, no echo: a UART does neither), keep the device side open so the agent may close
//! and reopen it (as after a USB replug), and write lines to the controller side. Writes block
//! when nobody reads and the pty's buffer is full, like a UART with hardware flow control, so
//! the writing happens on its own thread and never holds up MQTT publishing.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SerialError {
    #[error("could not create a pseudo-terminal (openpty): {0}; is /dev/ptmx available?")]
    OpenPty(io::Error),
    #[error("could not configure the pseudo-terminal {path} as raw: {source}")]
    Configure { path: PathBuf, source: io::Error },
    #[error("could not create the symlink {link} -> {path}: {source}; remove the old file or pick another path")]
    Symlink {
        link: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
}

/// The two ends of a pseudo-terminal: write to `controller`, the agent opens `device_path`.
pub struct PseudoTerminal {
    pub controller: File,
    /// Held open so the device side exists while the agent has it closed.
    _device: OwnedFd,
    pub device_path: PathBuf,
}

impl PseudoTerminal {
    pub fn open() -> Result<Self, SerialError> {
        let mut controller_fd: libc::c_int = -1;
        let mut device_fd: libc::c_int = -1;
        let mut name = [0 as libc::c_char; 256];
        // SAFETY: openpty writes two fds and a NUL-terminated name into buffers we own; the
        // name buffer is larger than any pts path; termios and winsize may be null.
        let result = unsafe {
            libc::openpty(
                &mut controller_fd,
                &mut device_fd,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if result != 0 {
            return Err(SerialError::OpenPty(io::Error::last_os_error()));
        }
        // SAFETY: openpty succeeded, so both fds are open and owned by nobody else.
        let controller = unsafe { File::from_raw_fd(controller_fd) };
        let device = unsafe { OwnedFd::from_raw_fd(device_fd) };
        // SAFETY: openpty NUL-terminated the name inside the buffer.
        let device_path = PathBuf::from(
            unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let raw_result = unsafe {
            let mut termios: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(device_fd, &mut termios) != 0 {
                -1
            } else {
                libc::cfmakeraw(&mut termios);
                libc::tcsetattr(device_fd, libc::TCSANOW, &termios)
            }
        };
        if raw_result != 0 {
            return Err(SerialError::Configure {
                path: device_path,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            controller,
            _device: device,
            device_path,
        })
    }

    /// Points `link` at the device path (replacing an existing symlink), for agent configs
    /// that name a stable path.
    pub fn symlink(&self, link: &Path) -> Result<(), SerialError> {
        if link
            .symlink_metadata()
            .is_ok_and(|metadata| metadata.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(link);
        }
        std::os::unix::fs::symlink(&self.device_path, link).map_err(|source| SerialError::Symlink {
            link: link.to_owned(),
            path: self.device_path.clone(),
            source,
        })
    }
}

/// Writes lines to a pseudo-terminal from a thread of its own.
pub struct SerialWriter {
    sender: Option<mpsc::Sender<Vec<u8>>>,
    /// The writer's result and the controller side, handed back so it stays open until drained.
    done: mpsc::Receiver<(io::Result<u64>, File)>,
    thread: Option<JoinHandle<()>>,
    pub device_path: PathBuf,
    _terminal_device: Option<OwnedFd>,
}

impl SerialWriter {
    pub fn start(terminal: PseudoTerminal) -> Self {
        let PseudoTerminal {
            mut controller,
            _device,
            device_path,
        } = terminal;
        let (sender, receiver) = mpsc::channel::<Vec<u8>>();
        let (done_sender, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut written_lines = 0u64;
            let result = (|| {
                for line in receiver {
                    controller.write_all(&line)?;
                    written_lines += 1;
                }
                controller.flush()?;
                Ok(written_lines)
            })();
            let _ = done_sender.send((result, controller));
        });
        Self {
            sender: Some(sender),
            done,
            thread: Some(thread),
            device_path,
            _terminal_device: Some(_device),
        }
    }

    pub fn write(&self, line: Vec<u8>) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(line);
        }
    }

    /// Waits up to `timeout` for every queued line to reach the pty. Returns the lines written,
    /// or an error if the writer failed or a reader did not drain the pty in time.
    pub fn finish(mut self, timeout: Duration) -> io::Result<u64> {
        self.sender = None;
        let deadline = Instant::now() + timeout;
        match self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok((result, _controller)) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                // Closing the controller side hangs the tty up and may discard what the reader
                // has not read yet: give the reader until the deadline to drain it.
                // The kernel moves written bytes to the reader's queue asynchronously, so the
                // queue must stay empty for a while, not just once.
                if let Some(device) = &self._terminal_device {
                    let mut empty_since: Option<Instant> = None;
                    loop {
                        let mut unread: libc::c_int = 0;
                        // SAFETY: FIONREAD writes one int for a valid tty fd we own.
                        let status =
                            unsafe { libc::ioctl(device.as_raw_fd(), libc::FIONREAD, &mut unread) };
                        if status != 0 {
                            break;
                        }
                        if unread == 0 {
                            let since = *empty_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= Duration::from_millis(100) {
                                break;
                            }
                        } else {
                            empty_since = None;
                        }
                        if Instant::now() >= deadline {
                            tracing::warn!(unread_bytes = unread, path = %self.device_path.display(), "nobody read the serial device's last lines");
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                result
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "serial lines still queued after {timeout:?}: nothing is reading {}",
                    self.device_path.display()
                ),
            )),
        }
    }
}
