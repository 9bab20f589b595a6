//! Phone numbers as providers send them, to E.164 (`+<country code><number>`).
//!
//! Twilio sends E.164; Plivo and Vonage send the same digits without `+`; Exotel sends
//! domestic numbers with the trunk prefix (`09876543210` in India). A connector created
//! with `--country` turns domestic numbers into E.164; anything that is not a number
//! (`client:alice`, `sip:…`, `anonymous`) is kept as sent.

/// A country whose domestic numbers a connector can turn into E.164.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country {
    pub iso: &'static str,
    pub calling_code: &'static str,
    /// The domestic trunk prefix dropped in E.164 (`0` in most countries).
    pub trunk: &'static str,
}

/// The countries `--country` takes: where the four providers sell numbers most.
pub const COUNTRIES: &[Country] = &[
    Country {
        iso: "IN",
        calling_code: "91",
        trunk: "0",
    },
    Country {
        iso: "US",
        calling_code: "1",
        trunk: "1",
    },
    Country {
        iso: "CA",
        calling_code: "1",
        trunk: "1",
    },
    Country {
        iso: "GB",
        calling_code: "44",
        trunk: "0",
    },
    Country {
        iso: "IE",
        calling_code: "353",
        trunk: "0",
    },
    Country {
        iso: "AU",
        calling_code: "61",
        trunk: "0",
    },
    Country {
        iso: "NZ",
        calling_code: "64",
        trunk: "0",
    },
    Country {
        iso: "SG",
        calling_code: "65",
        trunk: "",
    },
    Country {
        iso: "MY",
        calling_code: "60",
        trunk: "0",
    },
    Country {
        iso: "ID",
        calling_code: "62",
        trunk: "0",
    },
    Country {
        iso: "PH",
        calling_code: "63",
        trunk: "0",
    },
    Country {
        iso: "AE",
        calling_code: "971",
        trunk: "0",
    },
    Country {
        iso: "SA",
        calling_code: "966",
        trunk: "0",
    },
    Country {
        iso: "PK",
        calling_code: "92",
        trunk: "0",
    },
    Country {
        iso: "BD",
        calling_code: "880",
        trunk: "0",
    },
    Country {
        iso: "LK",
        calling_code: "94",
        trunk: "0",
    },
    Country {
        iso: "NP",
        calling_code: "977",
        trunk: "0",
    },
    Country {
        iso: "ZA",
        calling_code: "27",
        trunk: "0",
    },
    Country {
        iso: "NG",
        calling_code: "234",
        trunk: "0",
    },
    Country {
        iso: "KE",
        calling_code: "254",
        trunk: "0",
    },
    Country {
        iso: "DE",
        calling_code: "49",
        trunk: "0",
    },
    Country {
        iso: "FR",
        calling_code: "33",
        trunk: "0",
    },
    Country {
        iso: "NL",
        calling_code: "31",
        trunk: "0",
    },
    Country {
        iso: "ES",
        calling_code: "34",
        trunk: "",
    },
    Country {
        iso: "IT",
        calling_code: "39",
        trunk: "",
    },
    Country {
        iso: "BR",
        calling_code: "55",
        trunk: "0",
    },
    Country {
        iso: "MX",
        calling_code: "52",
        trunk: "",
    },
];

/// The country with this ISO code (any case).
pub fn country(iso: &str) -> Option<Country> {
    COUNTRIES
        .iter()
        .copied()
        .find(|c| c.iso.eq_ignore_ascii_case(iso.trim()))
}

/// How a provider writes numbers without `+`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digits {
    /// International digits without `+` (Plivo, Vonage): `919876543210`.
    International,
    /// Domestic digits with the trunk prefix (Exotel): `09876543210`.
    Domestic,
}

/// E.164 of `raw` where it is a number; otherwise `raw` trimmed, as sent. Empty → `None`.
pub fn normalize(raw: &str, digits: Digits, country: Option<Country>) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    // Separators people and some systems write; only removed when the rest is a number.
    let compact: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let (plus, rest) = match compact.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, compact.as_str()),
    };
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return Some(raw.to_owned());
    }
    if plus {
        return Some(format!("+{rest}"));
    }
    if let Some(intl) = rest.strip_prefix("00") {
        return Some(format!("+{intl}"));
    }
    match (digits, country) {
        (Digits::International, _) => Some(format!("+{rest}")),
        (Digits::Domestic, Some(c)) => {
            if !c.trunk.is_empty() && rest.starts_with(c.trunk) && rest.len() > c.trunk.len() + 6 {
                Some(format!("+{}{}", c.calling_code, &rest[c.trunk.len()..]))
            } else if rest.starts_with(c.calling_code) && rest.len() > 10 {
                // Already international, without `+` (e.g. 919876543210).
                Some(format!("+{rest}"))
            } else {
                Some(format!("+{}{rest}", c.calling_code))
            }
        }
        // Domestic digits of an unknown country: kept as sent rather than guessed.
        (Digits::Domestic, None) => Some(rest.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_e164() {
        let india = country("in");
        assert_eq!(
            normalize("09876543210", Digits::Domestic, india).unwrap(),
            "+919876543210"
        );
        assert_eq!(
            normalize("9876543210", Digits::Domestic, india).unwrap(),
            "+919876543210"
        );
        assert_eq!(
            normalize("919876543210", Digits::Domestic, india).unwrap(),
            "+919876543210"
        );
        assert_eq!(
            normalize("+91 98765-43210", Digits::Domestic, india).unwrap(),
            "+919876543210"
        );
        assert_eq!(
            normalize("00919876543210", Digits::Domestic, None).unwrap(),
            "+919876543210"
        );
        assert_eq!(
            normalize("14155550100", Digits::International, None).unwrap(),
            "+14155550100"
        );
        assert_eq!(
            normalize("+14155550100", Digits::International, None).unwrap(),
            "+14155550100"
        );
        assert_eq!(
            normalize("(415) 555-0100", Digits::Domestic, country("US")).unwrap(),
            "+14155550100"
        );
        assert_eq!(
            normalize("07700900123", Digits::Domestic, country("GB")).unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize("09876543210", Digits::Domestic, None).unwrap(),
            "09876543210"
        );
    }

    #[test]
    fn what_is_not_a_number_is_kept() {
        assert_eq!(
            normalize("client:alice", Digits::International, None).unwrap(),
            "client:alice"
        );
        assert_eq!(
            normalize("sip:alice@example.com", Digits::International, None).unwrap(),
            "sip:alice@example.com"
        );
        assert_eq!(
            normalize("anonymous", Digits::Domestic, country("IN")).unwrap(),
            "anonymous"
        );
        assert_eq!(normalize("  ", Digits::Domestic, None), None);
        assert_eq!(normalize("+", Digits::Domestic, None).unwrap(), "+");
    }

    #[test]
    fn unknown_countries_are_not_found() {
        assert!(country("XX").is_none());
        assert_eq!(country(" in ").unwrap().calling_code, "91");
    }
}
