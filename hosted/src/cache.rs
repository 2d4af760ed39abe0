//! QEMU's cache modes (`-t MODE` / `--cache=MODE` of qemu-io and qemu-img, `-n` of qemu-io): when the
//! writes of a command are made durable.
//!
//! | mode           | flush after each write | `flush` reaches the disk | QEMU opens with O_DIRECT |
//! |----------------|------------------------|--------------------------|--------------------------|
//! | `writethrough` | yes                    | yes                      | no                       |
//! | `directsync`   | yes                    | yes                      | yes                      |
//! | `writeback`    | no                     | yes                      | no                       |
//! | `none`, `off`  | no                     | yes                      | yes                      |
//! | `unsafe`       | no                     | no                       | no                       |
//!
//! A flush writes the image's cached metadata back to the file and then asks the host to make the file
//! durable (`fdatasync`). With `unsafe` only the second half is skipped: the metadata still reaches the file
//! on a flush and when the image is closed, so the image stays consistent unless the host itself goes down.
//!
//! This tool never bypasses the host page cache: `none` behaves as `writeback` and `directsync` as
//! `writethrough` (the same flushes, the same durability, but through the page cache).

/// A cache mode (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// Every write is flushed before it completes (`writethrough`, `directsync`).
    pub writethrough: bool,
    /// Flushes write cached metadata back but never ask the host for durability (`unsafe`).
    pub no_flush: bool,
    /// QEMU would bypass the host page cache (`none`, `directsync`, `-n`); recorded, not acted upon.
    pub direct: bool,
}

impl Default for CacheMode {
    /// qemu-io's default: `writethrough`.
    fn default() -> Self {
        CacheMode::WRITETHROUGH
    }
}

impl CacheMode {
    /// `writethrough`.
    pub const WRITETHROUGH: CacheMode = CacheMode {
        writethrough: true,
        no_flush: false,
        direct: false,
    };

    /// `writeback`.
    pub const WRITEBACK: CacheMode = CacheMode {
        writethrough: false,
        no_flush: false,
        direct: false,
    };

    /// `unsafe`.
    pub const UNSAFE: CacheMode = CacheMode {
        writethrough: false,
        no_flush: true,
        direct: false,
    };

    /// Parses a mode name as QEMU does (`bdrv_parse_cache_mode`: exact, lower-case names; `off` is `none`).
    /// The mode replaces whatever was chosen before.
    pub fn parse(mode: &str) -> Option<CacheMode> {
        let (writethrough, no_flush, direct) = match mode {
            "off" | "none" => (false, false, true),
            "directsync" => (true, false, true),
            "writeback" => (false, false, false),
            "unsafe" => (false, true, false),
            "writethrough" => (true, false, false),
            _ => return None,
        };
        Some(CacheMode {
            writethrough,
            no_flush,
            direct,
        })
    }

    /// qemu-io's `-n`: applied on top of the mode chosen so far, it turns the host cache off and write-through
    /// off, and keeps `unsafe`'s no-flush.
    pub fn nocache(self) -> CacheMode {
        CacheMode {
            writethrough: false,
            direct: true,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_qemu_parses_them() {
        for (name, wt, nf, d) in [
            ("writethrough", true, false, false),
            ("directsync", true, false, true),
            ("writeback", false, false, false),
            ("none", false, false, true),
            ("off", false, false, true),
            ("unsafe", false, true, false),
        ] {
            assert_eq!(
                CacheMode::parse(name),
                Some(CacheMode {
                    writethrough: wt,
                    no_flush: nf,
                    direct: d
                }),
                "{name}"
            );
        }
        for bad in ["", "WriteBack", "on", "writeback ", "direct"] {
            assert_eq!(CacheMode::parse(bad), None, "{bad:?}");
        }
        assert_eq!(CacheMode::default(), CacheMode::WRITETHROUGH);
        let unsafe_n = CacheMode::parse("unsafe").map(CacheMode::nocache);
        assert_eq!(
            unsafe_n,
            Some(CacheMode {
                writethrough: false,
                no_flush: true,
                direct: true
            })
        );
        assert_eq!(
            CacheMode::WRITETHROUGH.nocache(),
            CacheMode::parse("none").unwrap()
        );
    }
}
