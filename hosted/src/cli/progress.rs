//! qemu-img's `-p` progress line: "    (xx.xx/100%)" followed by a carriage return, redrawn when the value moves
//! by more than a threshold, and a newline at the end. QEMU keeps the value in a C `float`; so does this.

use std::io::Write;

/// Progress state (prints nothing when disabled).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// `min_skip` is how far (in percent) the value must move before it is redrawn.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// QEMU's `qemu_progress_print(delta, max)`: with `max == 0`, `delta` is the new value; otherwise the
    /// value grows by `delta` percent of `max`.
    pub fn print(&mut self, delta: f32, max: i32, out: &mut dyn Write) -> std::io::Result<()> {
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            if self.enabled {
                write!(out, "    ({:.2}/100%)\r", f64::from(current))?;
                out.flush()?;
            }
        }
        Ok(())
    }

    /// Ends the progress line.
    pub fn end(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.enabled {
            writeln!(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_qemu_convert() {
        let mut out = Vec::new();
        let mut p = Progress::new(true, 1.0);
        p.print(0.0, 100, &mut out).unwrap();
        for done in [8u64, 136, 264] {
            p.print((100.0 * done as f64 / 264.0) as f32, 0, &mut out)
                .unwrap();
        }
        p.print(100.0, 0, &mut out).unwrap();
        p.end(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (3.03/100%)\r    (51.52/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn small_steps_are_not_redrawn() {
        let mut out = Vec::new();
        let mut p = Progress::new(true, 2.0);
        p.print(0.0, 100, &mut out).unwrap();
        p.print(1.0, 100, &mut out).unwrap();
        p.print(1.5, 100, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (2.50/100%)\r"
        );
    }
}
