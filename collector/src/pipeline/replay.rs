//! `tributary-collector replay`: rebuild results from the log into a new set of tables.
//!
//! Why this is only argument parsing: a replay *is* the consumer loop (Kappa: one code
//! path), started from an offset or a time with fresh engines, writing into a store whose
//! tables carry a suffix, and ending once it reached the log's end as it was at start.

use super::consumer::StartFrom;

/// Parses `--from`: a plain number is an offset (the same in every partition); a number
/// followed by `ms` is a log time in milliseconds since the epoch; an RFC 3339 time
/// (`2026-01-01T00:00:00Z`, `2026-01-01T01:00:00.5+01:00`) is a log time.
pub fn parse_replay_start(text: &str) -> Result<StartFrom, String> {
    let text = text.trim();
    if let Ok(offset) = text.parse::<u64>() {
        return Ok(StartFrom::Offset(offset));
    }
    if let Some(number) = text.strip_suffix("ms") {
        return number
            .trim()
            .parse::<i64>()
            .map(StartFrom::TimeMs)
            .map_err(|_| {
                format!("{text:?}: expected milliseconds since the epoch, like 1767225600000ms")
            });
    }
    parse_rfc3339_ms(text).map(StartFrom::TimeMs).ok_or_else(|| {
        format!(
            "{text:?} is neither an offset (e.g. 0), a time in ms (e.g. 1767225600000ms) nor an RFC 3339 time (e.g. 2026-01-01T00:00:00Z)"
        )
    })
}

/// Checks a replay suffix: it becomes part of a database or directory name.
pub fn validate_suffix(suffix: &str) -> Result<(), String> {
    if suffix.is_empty()
        || suffix.len() > 32
        || !suffix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "replay suffix {suffix:?} is not usable: use 1 to 32 characters from A-Z a-z 0-9 _"
        ));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to milliseconds since the epoch.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if bytes.len() < 20
        || bytes.get(4) != Some(&b'-')
        || bytes.get(7) != Some(&b'-')
        || !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        || bytes.get(13) != Some(&b':')
        || bytes.get(16) != Some(&b':')
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut position = 19;
    let mut millis = 0;
    if bytes.get(position) == Some(&b'.') {
        let start = position + 1;
        let mut end = start;
        while bytes.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        let digits = text.get(start..end)?;
        if digits.is_empty() {
            return None;
        }
        let padded: String = digits.chars().chain("000".chars()).take(3).collect();
        millis = padded.parse::<i64>().ok()?;
        position = end;
    }
    let offset_minutes = match text.get(position..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6
            && matches!(zone.as_bytes()[0], b'+' | b'-')
            && zone.as_bytes()[3] == b':' =>
        {
            let hours = number(position + 1..position + 3)?;
            let minutes = number(position + 4..position + 6)?;
            let sign = if zone.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1_000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_times_in_ms_and_rfc3339_times_parse() {
        assert_eq!(parse_replay_start("42"), Ok(StartFrom::Offset(42)));
        assert_eq!(
            parse_replay_start("1767225600000ms"),
            Ok(StartFrom::TimeMs(1_767_225_600_000))
        );
        assert_eq!(
            parse_replay_start("2026-01-01T00:00:00Z"),
            Ok(StartFrom::TimeMs(1_767_225_600_000))
        );
        assert_eq!(
            parse_replay_start("2026-01-01T01:00:00.5+01:00"),
            Ok(StartFrom::TimeMs(1_767_225_600_500))
        );
        assert_eq!(
            parse_replay_start("1970-01-01T00:00:00Z"),
            Ok(StartFrom::TimeMs(0))
        );
        assert_eq!(
            parse_replay_start("2024-02-29T12:00:00Z"),
            Ok(StartFrom::TimeMs(1_709_208_000_000))
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-01-01",
            "-5",
            "12s",
        ] {
            assert!(parse_replay_start(bad).is_err(), "{bad}");
        }
        assert!(validate_suffix("rebuild_2").is_ok());
        assert!(validate_suffix("a-b").is_err());
        assert!(validate_suffix("").is_err());
    }
}
