//! Optional logging. With feature `defmt` the engine's messages go to `defmt`, with feature `log` to the
//! `log` crate's logger; with neither they compile to nothing (their arguments are not evaluated). The two
//! features exclude each other. Messages use only `{}` placeholders with integer and `&str` arguments, which
//! both backends format.

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!(
    "qcow2-core: the `defmt` and `log` features are mutually exclusive; enable one logging backend"
);

/// Logs at `$level` (`trace`, `debug`, `info`, `warn` or `error`) through the enabled backend.
macro_rules! log_at {
    ($level:ident, $fmt:literal $(, $arg:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        defmt::$level!($fmt $(, $arg)*);
        #[cfg(feature = "log")]
        ::log::$level!($fmt $(, $arg)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        {
            $(let _ = || &$arg;)*
        }
    }};
}

pub(crate) use log_at;
