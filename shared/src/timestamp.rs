//! Timestamps and dates as the pipeline reads and writes them: the one parser both trust
//! boundaries use and the one writer whose output that parser reads back.
//!
//! RFC 3339 writes four-digit years, so a local time of year 0000–9999 with an offset of up
//! to ±23:59 can name an instant whose UTC year is −1 or 10000 (`9999-12-31T23:59:59-05:00`,
//! a common "no end date" placeholder of CRM exports, is `10000-01-01T04:59:59Z`). Such an
//! instant is accepted and stored (Postgres' `timestamptz` reaches far beyond), and written
//! with the offset of ±23:59 that brings it back into four-digit years, so the worker reads
//! exactly the instant the gateway accepted. Every other instant is written in UTC (`Z`),
//! byte for byte as before. The instants that no RFC 3339 text can name after the
//! normalisation to microseconds (only a leap second at the very end of year 9999, far
//! west) are refused: the gateway never answers 201 to what the worker could not read.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, SecondsFormat, TimeDelta, Utc};

/// The widest offset RFC 3339 can write, in seconds (23:59).
const WIDEST_OFFSET_SECS: i32 = 23 * 3600 + 59 * 60;

/// The earliest instant an RFC 3339 text can name: `0000-01-01T00:00:00+23:59`.
pub fn earliest() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(0, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("0000-01-01T00:00:00 is a valid proleptic Gregorian time")
        .and_utc()
        - TimeDelta::seconds(i64::from(WIDEST_OFFSET_SECS))
}

/// The latest instant an RFC 3339 text can name at microsecond precision:
/// `9999-12-31T23:59:59.999999-23:59`.
pub fn latest() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999))
        .expect("9999-12-31T23:59:59.999999 is a valid proleptic Gregorian time")
        .and_utc()
        + TimeDelta::seconds(i64::from(WIDEST_OFFSET_SECS))
}

/// Reads an RFC 3339 timestamp, kept to the microsecond (Postgres' precision, so the
/// stored value is the read one; a leap second becomes the next second's start, as in
/// Postgres). `None` when the text is not RFC 3339 or names an instant [`format`] could
/// not write back.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s).ok()?;
    let t = DateTime::from_timestamp_micros(t.timestamp_micros())?;
    (earliest() <= t && t <= latest()).then_some(t)
}

/// Writes a timestamp that [`parse`] reads back to the same instant: UTC (`Z`, sub-second
/// digits as needed) for years 0000–9999, else with the offset of ±23:59 that keeps the
/// local year within four digits.
///
/// Only instants from [`parse`] (or the clock) reach here; one outside `earliest..=latest`
/// is written in chrono's extended form, which [`parse`] refuses.
pub fn format(t: &DateTime<Utc>) -> String {
    let offset_secs = match t.year() {
        year if year > 9999 => -WIDEST_OFFSET_SECS,
        year if year < 0 => WIDEST_OFFSET_SECS,
        _ => return t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    };
    let offset = FixedOffset::east_opt(offset_secs).expect("±23:59 is a valid offset");
    t.with_timezone(&offset)
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Reads a `YYYY-MM-DD` date: exactly four digits of year, two of month and of day (a
/// signed or five-digit year is refused: it could not be written back in this form).
pub fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let shaped = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shaped {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Reads an RFC 3339 timestamp at whatever precision it has (the gateway's clock writes
/// nanoseconds into `received_at`), within the instants [`format`] writes back.
pub fn parse_precise(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    (earliest() <= t && t <= latest() + TimeDelta::microseconds(1) - TimeDelta::nanoseconds(1))
        .then_some(t)
}

/// `#[serde(with = "…")]` for a required timestamp: written by [`format`], read by
/// [`parse_precise`] (validation, which keeps microseconds, is [`parse`]'s).
pub mod required {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        super::parse_precise(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 timestamp within years 0000-9999"
            ))
        })
    }
}

/// `#[serde(with = "…")]` for an optional timestamp (pair it with `default`).
pub mod optional {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::required::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::required")] DateTime<Utc>);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(t)| t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_probes_edge_timestamps_read_back_as_the_same_instant() {
        for (text, written) in [
            ("9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-23:59"),
            ("9999-12-31T23:59:59-05:00", "9999-12-31T05:00:59-23:59"),
            ("9999-12-31T23:59:60Z", "9999-12-31T00:01:00-23:59"),
            ("0000-01-01T00:00:00+00:01", "0000-01-01T23:58:00+23:59"),
            ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
            ("2025-11-25T10:30:00+05:30", "2025-11-25T05:00:00Z"),
            ("2025-11-25T10:30:00.120Z", "2025-11-25T10:30:00.120Z"),
        ] {
            let t = parse(text).unwrap_or_else(|| panic!("{text} is refused"));
            assert_eq!(format(&t), written, "{text}");
            assert_eq!(parse(&format(&t)), Some(t), "{text}");
        }
    }

    #[test]
    fn only_a_leap_second_past_the_last_writable_instant_is_refused() {
        assert_eq!(parse("9999-12-31T23:59:60-23:59"), None);
        assert_eq!(parse("9999-12-31T23:59:60.5-23:59"), None);
        assert!(parse("9999-12-31T23:59:60.5-23:58").is_some());
        assert!(parse("9999-12-31T23:59:59.999999999-23:59").is_some());
        assert_eq!(parse("+10000-01-01T00:00:00Z"), None);
        assert_eq!(parse("-0001-12-31T00:00:00Z"), None);
    }

    #[test]
    fn dates_are_four_digit_years_only() {
        for bad in [
            "-999-12-31",
            "-001-01-01",
            "+10000-1-1",
            "+999-12-31",
            "2025-1-011",
            "2025-02-30",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert!(parse_date("0000-01-01").is_some());
        assert!(parse_date("9999-12-31").is_some());
    }

    /// Timestamps at the edges of the year range, the clock and the offsets.
    fn edge_timestamp() -> impl Strategy<Value = String> {
        let year = prop_oneof![Just(0u32), Just(1), Just(9998), Just(9999), 0u32..=9999];
        let month = prop_oneof![Just(1u32), Just(12), 1u32..=12];
        let day = prop_oneof![Just(1u32), Just(31), Just(28), 1u32..=31];
        let second = prop_oneof![Just(0u32), Just(59), Just(60), 0u32..=60];
        let fraction = prop_oneof![
            Just(String::new()),
            (0u32..1_000_000_000, 1usize..=9)
                .prop_map(|(n, digits)| format!(".{:09}", n)[..=digits].to_owned()),
        ];
        let offset = prop_oneof![
            Just("Z".to_owned()),
            Just("+23:59".to_owned()),
            Just("-23:59".to_owned()),
            Just("+00:01".to_owned()),
            Just("-00:01".to_owned()),
            (any::<bool>(), 0u32..24, 0u32..60)
                .prop_map(|(neg, h, m)| format!("{}{h:02}:{m:02}", if neg { '-' } else { '+' })),
        ];
        (
            year,
            month,
            day,
            0u32..24,
            0u32..60,
            second,
            fraction,
            offset,
        )
            .prop_map(|(y, mo, d, h, mi, s, frac, off)| {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{off}")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever is read is written in a form that is read back to the same instant.
        #[test]
        fn every_accepted_timestamp_is_written_readably(text in edge_timestamp()) {
            if let Some(t) = parse(&text) {
                let written = format(&t);
                prop_assert_eq!(parse(&written), Some(t), "{} written as {}", text, written);
            }
            if let Some(t) = parse_precise(&text) {
                let written = format(&t);
                prop_assert_eq!(parse_precise(&written), Some(t), "{} written as {}", text, written);
            }
        }

        /// A timestamp is refused only when it names an instant beyond the writable range.
        #[test]
        fn a_refusal_is_only_for_an_unwritable_instant(text in edge_timestamp()) {
            if let Ok(t) = DateTime::parse_from_rfc3339(&text) {
                let micros = DateTime::from_timestamp_micros(t.timestamp_micros());
                let writable = micros.is_some_and(|m| earliest() <= m && m <= latest());
                prop_assert_eq!(parse(&text).is_some(), writable, "{}", text);
            }
        }

        #[test]
        fn every_accepted_date_reads_back(y in 0i32..=9999, ordinal in 1u32..=366) {
            if let Some(d) = NaiveDate::from_yo_opt(y, ordinal) {
                prop_assert_eq!(parse_date(&d.to_string()), Some(d));
            }
        }
    }
}
