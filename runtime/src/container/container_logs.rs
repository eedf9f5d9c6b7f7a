//! logs: reads a container's CRI log, optionally following it until the container exits.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::Duration;

use super::crilog::{LogLine, parse_line};
use super::{ContainerError, ContainerRuntime};
use crate::fsutil::FsError;

impl ContainerRuntime {
    /// Asks the monitor to reopen the log file (after a rotator renamed it away). A container
    /// whose monitor is gone has nothing to reopen.
    pub fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let run: super::state::RunState =
            super::state::read_json(&self.paths.run_state(id))?.unwrap_or_default();
        if let Some(monitor) = run.monitor {
            const SIGUSR1: i32 = 10;
            monitor
                .signal(SIGUSR1)
                .map_err(|e| ContainerError::Monitor {
                    id: id.to_string(),
                    reason: format!("signal for log reopen: {e}"),
                })?;
        }
        Ok(())
    }

    /// Calls `on_line` for every entry of the log; with `follow`, keeps reading new entries
    /// until the container has exited and its log is drained. `on_line` returning false stops.
    pub fn read_log(
        &self,
        id: &str,
        follow: bool,
        on_line: &mut dyn FnMut(LogLine) -> bool,
    ) -> Result<(), ContainerError> {
        let rec = self.record(id)?;
        let path = rec.log_path.clone();
        let mut pos = 0u64;
        let mut partial = String::new();
        loop {
            // Checked before reading: the monitor writes exit.json after the last log line.
            let exited = !follow || self.status(id)?.exit.is_some();
            match std::fs::File::open(&path) {
                Ok(mut f) => {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if len < pos {
                        pos = 0; // rotated
                    }
                    f.seek(SeekFrom::Start(pos))
                        .map_err(|e| FsError::new("seek", &path, e))?;
                    let mut r = BufReader::new(f);
                    loop {
                        let mut line = String::new();
                        let n = r
                            .read_line(&mut line)
                            .map_err(|e| FsError::new("read", &path, e))?;
                        if n == 0 {
                            break;
                        }
                        pos += n as u64;
                        if !line.ends_with('\n') {
                            partial.push_str(&line);
                            continue;
                        }
                        partial.push_str(line.trim_end_matches('\n'));
                        let full = std::mem::take(&mut partial);
                        if let Some(l) = parse_line(&full)
                            && !on_line(l)
                        {
                            return Ok(());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FsError::new("open", &path, e).into()),
            }
            if exited {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
