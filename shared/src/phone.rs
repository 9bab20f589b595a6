//! Phone numbers: the one reading of a written number that the provider connectors (to
//! store E.164) and erasure (to match every written form of a number) share.
//!
//! - [`compact`]: a written number as `+`/digits, whatever its separators (spaces of any
//!   width, non-breaking ones, `-`, `.`, `/`, brackets, Unicode dashes), full-width digits
//!   and `＋`, and a `tel:` prefix; `None` for what is not a number (`client:alice`).
//! - [`normalize`]: E.164 (`+<country code><number>`) as a connector stores it. Twilio
//!   sends E.164; Plivo and Vonage the same digits without `+`; Exotel domestic numbers
//!   with the trunk prefix (`09876543210` in India), turned into E.164 with the
//!   connector's `--country`.
//! - [`match_key`]: what a write hashes for erasure: the number's digits (`00` read as an
//!   international prefix, `+` dropped), so `+91 98765 43210`, `919876543210` and
//!   `tel:+91-98765-43210` are one key; [`erasure_forms`]: the keys an erasure of a number
//!   matches, its domestic forms included when its country is known.

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

/// A written number reduced to its `+` and digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compact {
    /// Written with `+` (or `00`): international.
    pub plus: bool,
    /// The digits, `00` prefix removed when `plus`.
    pub digits: String,
}

/// Whether `c` separates digits in how people and systems write numbers.
fn separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '.'
                | '/'
                | '('
                | ')'
                | '['
                | ']'
                | '\u{00A0}'
                | '\u{2007}'
                | '\u{202F}'
                | '\u{2060}'
                | '\u{200B}'
                | '\u{2010}'
                ..='\u{2015}'
                    | '\u{2212}'
                    | '\u{FF0D}'
                    | '\u{FF0E}'
                    | '\u{FF0F}'
                    | '\u{FF08}'
                    | '\u{FF09}'
                    | '\u{3000}'
        )
}

/// `raw` as `+` and digits: full-width digits and plus folded, a `tel:` prefix and every
/// separator removed, `00` read as `+`. `None` when what is left is not a number.
pub fn compact(raw: &str) -> Option<Compact> {
    let raw = raw.trim();
    let raw = match raw.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("tel:") => &raw[4..],
        _ => raw,
    };
    let mut out = String::with_capacity(raw.len());
    let mut plus = false;
    for c in raw.chars() {
        let c = match c {
            '\u{FF10}'..='\u{FF19}' => char::from(b'0' + (c as u32 - 0xFF10) as u8),
            '\u{FF0B}' => '+',
            c => c,
        };
        match c {
            '0'..='9' => out.push(c),
            '+' if out.is_empty() && !plus => plus = true,
            c if separator(c) => {}
            _ => return None,
        }
    }
    if out.is_empty() {
        return None;
    }
    if !plus {
        if let Some(intl) = out.strip_prefix("00").filter(|r| !r.is_empty()) {
            return Some(Compact {
                plus: true,
                digits: intl.to_owned(),
            });
        }
    }
    Some(Compact { plus, digits: out })
}

/// E.164 of `raw` where it is a number; otherwise `raw` trimmed, as sent. Empty → `None`.
pub fn normalize(raw: &str, digits: Digits, country: Option<Country>) -> Option<String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return None;
    }
    let Some(Compact { plus, digits: rest }) = compact(trimmed) else {
        return Some(trimmed.to_owned());
    };
    if plus {
        return Some(format!("+{rest}"));
    }
    match (digits, country) {
        (Digits::International, _) => Some(format!("+{rest}")),
        (Digits::Domestic, Some(c)) => Some(format!("+{}", international(&rest, c))),
        // Domestic digits of an unknown country: kept as sent rather than guessed.
        (Digits::Domestic, None) => Some(rest),
    }
}

/// Domestic digits of `c` (with or without the trunk prefix, or already international
/// without `+`) as international digits.
fn international(rest: &str, c: Country) -> String {
    if !c.trunk.is_empty() && rest.starts_with(c.trunk) && rest.len() > c.trunk.len() + 6 {
        format!("{}{}", c.calling_code, &rest[c.trunk.len()..])
    } else if rest.starts_with(c.calling_code) && rest.len() > 10 {
        // Already international, without `+` (e.g. 919876543210).
        rest.to_owned()
    } else {
        format!("{}{rest}", c.calling_code)
    }
}

/// What a write hashes for a number, to match erasures: its digits (`+` and `00`
/// dropped), or for what is not a number the text as written, trimmed.
pub fn match_key(raw: &str) -> String {
    compact(raw).map_or_else(|| raw.trim().to_owned(), |c| c.digits)
}

/// The keys ([`match_key`]) an erasure of the number `raw` matches, and in words (never
/// the number) the written forms they are and those they are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forms {
    /// Distinct keys, the international one first when known.
    pub keys: Vec<String>,
    /// What each key is, in the order of `keys`, without its digits.
    pub covered: Vec<String>,
    /// Written forms of the number no key matches, for the operator.
    pub uncovered: Vec<String>,
}

/// The keys an erasure of `raw` matches: its international digits, and with a country
/// (given, or the number's own calling code among `countries`) its domestic forms: the
/// national number with and without the trunk prefix.
pub fn erasure_forms(raw: &str, countries: &[Country]) -> Forms {
    let mut forms = Forms {
        keys: Vec::new(),
        covered: Vec::new(),
        uncovered: vec![
            "numbers written with letters (1-800-FLOWERS) or with an extension (x123, ;ext=)"
                .to_owned(),
        ],
    };
    let push = |k: String, what: String, forms: &mut Forms| {
        if !k.is_empty() && !forms.keys.contains(&k) {
            forms.keys.push(k);
            forms.covered.push(what);
        }
    };
    let Some(c) = compact(raw) else {
        push(
            raw.trim().to_owned(),
            "this exact text (it is not a number)".to_owned(),
            &mut forms,
        );
        forms.uncovered = vec!["it is not a number: any other writing of it".to_owned()];
        return forms;
    };
    // The international digits, and the country they are of.
    let (intl, country) = if c.plus {
        let country = countries
            .iter()
            .copied()
            .find(|k| c.digits.starts_with(k.calling_code));
        (Some(c.digits.clone()), country)
    } else {
        match countries.first().copied() {
            Some(k) => (Some(international(&c.digits, k)), Some(k)),
            None => (None, None),
        }
    };
    match (intl, country) {
        (Some(intl), Some(k)) => {
            let cc = k.calling_code;
            let national = intl[cc.len()..].to_owned();
            push(
                intl.clone(),
                format!("international (+{cc}…, {cc}…, 00{cc}…)"),
                &mut forms,
            );
            if !k.trunk.is_empty() {
                push(
                    format!("{}{national}", k.trunk),
                    format!("domestic with the trunk prefix ({}…, {})", k.trunk, k.iso),
                    &mut forms,
                );
            }
            push(
                national,
                format!("the national number alone ({})", k.iso),
                &mut forms,
            );
            forms.uncovered.push(format!(
                "the domestic forms of other countries than {} (give --country for each)",
                k.iso
            ));
        }
        (Some(intl), None) => {
            push(
                intl,
                "international (+…, 00…, or its digits)".to_owned(),
                &mut forms,
            );
            forms.uncovered.push(
                "domestic forms (0…, or the national number alone): its country is not known; give --country"
                    .to_owned(),
            );
        }
        (None, _) => {
            push(
                c.digits.clone(),
                "as written (its digits)".to_owned(),
                &mut forms,
            );
            forms.uncovered.push(
                "the international form (+…) and other domestic forms: its country is not known; give --country"
                    .to_owned(),
            );
        }
    }
    forms
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

    /// The forms a connector's number (E.164) and an erasure must agree on: every written
    /// form of one Indian number, stored as a connector stores it or as a dialer sent it,
    /// gives a key an erasure of any other form of it (country IN) matches.
    #[test]
    fn every_written_form_of_a_number_meets_its_erasure() {
        let india = [country("IN").unwrap()];
        let written = [
            "+919876543210",
            "+91 98765 43210",
            "919876543210",
            "0091 98765 43210",
            "09876543210",
            "9876543210",
            "+91/98765/43210",
            "+91\u{00A0}98765\u{00A0}43210",
            "\u{FF0B}\u{FF19}\u{FF11}\u{FF19}\u{FF18}\u{FF17}\u{FF16}\u{FF15}\u{FF14}\u{FF13}\u{FF12}\u{FF11}\u{FF10}",
            "tel:+91-98765-43210",
            "TEL:09876543210",
            "(+91) 98765\u{2013}43210",
        ];
        for erased in written {
            let forms = erasure_forms(erased, &india);
            for stored in written {
                // As a dialer sent it, and as an Exotel connector of India stores it.
                let as_sent = match_key(stored);
                let by_connector = match_key(
                    &normalize(stored, Digits::Domestic, india.first().copied()).unwrap(),
                );
                assert!(
                    forms.keys.contains(&as_sent),
                    "erase {erased:?}: {stored:?} as sent ({as_sent})"
                );
                assert!(
                    forms.keys.contains(&by_connector),
                    "erase {erased:?}: {stored:?} via a connector"
                );
            }
        }
        // Another number is another key.
        assert!(!erasure_forms("+919876543210", &india)
            .keys
            .contains(&match_key("+919876543211")));
        // Without a country, the domestic form is matched as written only, and said so.
        let bare = erasure_forms("09876543210", &[]);
        assert_eq!(bare.keys, ["09876543210"]);
        assert!(bare.uncovered.iter().any(|u| u.contains("--country")));
        let intl = erasure_forms("+91 98765 43210", &[]);
        assert_eq!(intl.keys, ["919876543210"]);
        assert!(intl.uncovered.iter().any(|u| u.contains("domestic")));
        // What is not a number: its text.
        assert_eq!(
            erasure_forms(" client:alice ", &india).keys,
            ["client:alice"]
        );
        assert_eq!(match_key("client:alice"), "client:alice");
    }

    #[test]
    fn unknown_countries_are_not_found() {
        assert!(country("XX").is_none());
        assert_eq!(country(" in ").unwrap().calling_code, "91");
    }
}
