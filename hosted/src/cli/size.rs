//! Numbers in and out the way QEMU's tools write and read them.

/// Why a size did not parse (QEMU's `-EINVAL` and `-ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown or trailing suffix.
    Invalid,
    /// Larger than `i64::MAX`.
    TooLarge,
}

/// Multiplier of a size suffix with 1024 as the unit.
fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// Parses a size the way qemu-io's and qemu-img's size arguments do: decimal with an optional fraction and an
/// optional suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, either case, powers of 1024, default bytes), or `0x` hex
/// without fraction or suffix. A fraction needs a suffix other than `b`; the result is rounded to the nearest
/// byte. Results above `i64::MAX` are [`SizeError::TooLarge`].
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && (b[i] == b' ' || (b'\t'..=b'\r').contains(&b[i])) {
        i += 1;
    }
    if i < b.len() && b[i] == b'+' {
        i += 1;
    }
    if i < b.len() && b[i] == b'-' {
        // strtoull would negate; QEMU's parse_uint rejects negative numbers.
        return Err(SizeError::Invalid);
    }
    let int_start = i;
    let mut val: u64 = 0;
    let mut overflow = false;
    while i < b.len() && b[i].is_ascii_digit() {
        match val
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b[i] - b'0')))
        {
            Some(v) => val = v,
            None => overflow = true,
        }
        i += 1;
    }
    let have_int = i > int_start;
    if overflow {
        return Err(SizeError::TooLarge);
    }
    let mut frac: u64 = 0; // fraction as 0.64 fixed point
    let mut have_frac = false;
    if have_int && val == 0 && i < b.len() && (b[i] == b'x' || b[i] == b'X') {
        // Hex: digits after the prefix, no fraction, no suffix.
        let hex_start = i + 1;
        let mut j = hex_start;
        let mut v: u64 = 0;
        while j < b.len() && b[j].is_ascii_hexdigit() {
            let d = u64::from((b[j] as char).to_digit(16).unwrap_or(0));
            match v.checked_mul(16).and_then(|x| x.checked_add(d)) {
                Some(x) => v = x,
                None => return Err(SizeError::TooLarge),
            }
            j += 1;
        }
        // Only the single leading "0" may precede the x.
        if j == hex_start || i - int_start != 1 {
            return Err(SizeError::Invalid);
        }
        if j < b.len() {
            return Err(SizeError::Invalid);
        }
        return if v > i64::MAX as u64 {
            Err(SizeError::TooLarge)
        } else {
            Ok(v)
        };
    } else if i < b.len() && b[i] == b'.' {
        let mut j = i + 1;
        let digits_start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if !have_int && j == digits_start {
            return Err(SizeError::Invalid);
        }
        // "0.<digits>" as a double, then to 64-bit fixed point, as QEMU does.
        let text = format!("0.{}", &s[digits_start..j]);
        let f: f64 = text.parse().unwrap_or(0.0);
        frac = if f >= 1.0 {
            u64::MAX
        } else {
            (f * 18_446_744_073_709_551_616.0) as u64
        };
        have_frac = true;
        i = j;
    } else if !have_int {
        return Err(SizeError::Invalid);
    }
    let mut mul = 1;
    if i < b.len() {
        match suffix_mul(b[i]) {
            Some(m) => {
                mul = m;
                i += 1;
            }
            None => return Err(SizeError::Invalid),
        }
    }
    if i != b.len() {
        return Err(SizeError::Invalid);
    }
    let result = if mul == 1 {
        if have_frac && frac != 0 {
            return Err(SizeError::Invalid);
        }
        val
    } else {
        let whole = u128::from(val) * u128::from(mul);
        let frac_part = u128::from(frac) * u128::from(mul); // 64.64 fixed point
        let total = whole + (frac_part >> 64) + ((frac_part >> 63) & 1);
        if total > u128::from(u64::MAX) {
            return Err(SizeError::TooLarge);
        }
        total as u64
    };
    if result > i64::MAX as u64 {
        return Err(SizeError::TooLarge);
    }
    Ok(result)
}

/// Formats `x` like C's `%.3g`.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_string();
    }
    // Round to three significant digits first; the exponent after rounding decides the style.
    let sci = format!("{:.2e}", x);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (2 - exp) as usize;
        strip_zeros(&format!("{:.*}", decimals, x)).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: "64 MiB", "12.5 KiB", "0 B", "0.977 KiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) gives exponent e with 2^(e-1) <= x < 2^e; the unit is (e - 1) / 10.
    let x = val as f64 / (1000.0 / 1024.0);
    let e: i32 = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i32 + 1
    };
    // Guard log2's rounding at exact powers of two.
    let e = if x != 0.0 && (x >= 2f64.powi(e)) {
        e + 1
    } else if x != 0.0 && x < 2f64.powi(e - 1) {
        e - 1
    } else {
        e
    };
    let i = (((e - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

/// qemu-io's `cvtstr`: "4 KiB", "1.500 KiB", "40 bytes".
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    // Units get three decimals, plain bytes six (C's "%f"); a ".000" and whatever follows it is cut.
    let (text, suffix) = match UNITS.iter().find(|(unit, _)| value >= *unit) {
        Some(&(unit, s)) => (format!("{:.3}", value / unit), s),
        None => (format!("{:.6}", value), " bytes"),
    };
    match text.find(".000") {
        Some(pos) => format!("{}{}", &text[..pos], suffix),
        None => format!("{text}{suffix}"),
    }
}

/// qemu-io's elapsed time: "00.00 sec" under a second, "H:MM:SS.ss" otherwise.
pub fn timestr(elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs();
    let frac = f64::from(elapsed.subsec_nanos()) / 1e9;
    if secs == 0 {
        format!("{:05.2} sec", frac)
    } else {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    }
}

/// qemu-io's pattern byte: C `strtol(arg, .., 0)` (decimal, `0x` hex or `0` octal, optional sign), 0..=255,
/// nothing after the number.
pub fn parse_pattern(arg: &str) -> Option<u8> {
    let t = arg.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if (t.starts_with("0x") || t.starts_with("0X"))
        && t.as_bytes().get(2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        (16, &t[2..])
    } else if t.starts_with('0') {
        (8, t)
    } else {
        (10, t)
    };
    if digits.is_empty() {
        // strtol parses nothing: value 0 and the end pointer stays at the start, which is only the end of the
        // string when the argument is empty.
        return if arg.is_empty() { Some(0) } else { None };
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(digits, radix).unwrap_or(i64::MAX);
    let v = if neg { -v } else { v };
    u8::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("+5"), Ok(5));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("1e"), Ok(1 << 60));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert_eq!(parse_size("0x7fffffffffffffff"), Ok(i64::MAX as u64));
        for bad in [
            "", "1.5", "1.5b", "0x10k", "0x", "0x1.5", "00x5", "1kB", "1e3k", "1.e3k", "abc", "-1",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
        }
        for big in ["8E", "16E", "0xffffffffffffffff", "99999999999999999999"] {
            assert_eq!(parse_size(big), Err(SizeError::TooLarge), "{big}");
        }
    }

    #[test]
    fn size_to_str_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(12800), "12.5 KiB");
        assert_eq!(size_to_str(135168), "132 KiB");
        assert_eq!(size_to_str(393216), "384 KiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(10240), "10 KiB");
    }

    #[test]
    fn cvtstr_like_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(40.0), "40 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(69632.0), "68 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(259.318682), "259.318682 bytes");
    }

    #[test]
    fn patterns_like_strtol() {
        assert_eq!(parse_pattern("0xab"), Some(0xab));
        assert_eq!(parse_pattern("171"), Some(171));
        assert_eq!(parse_pattern("017"), Some(15));
        assert_eq!(parse_pattern("0"), Some(0));
        assert_eq!(parse_pattern("-0"), Some(0));
        assert_eq!(parse_pattern(""), Some(0));
        assert_eq!(parse_pattern("0x1ff"), None);
        assert_eq!(parse_pattern("ab"), None);
        assert_eq!(parse_pattern("0x"), None);
        assert_eq!(parse_pattern("-1"), None);
        assert_eq!(parse_pattern("256"), None);
    }

    #[test]
    fn timestr_formats() {
        assert_eq!(timestr(std::time::Duration::from_millis(0)), "00.00 sec");
        assert_eq!(timestr(std::time::Duration::from_millis(250)), "00.25 sec");
        assert_eq!(
            timestr(std::time::Duration::from_millis(61_500)),
            "0:01:01.50"
        );
    }
}
