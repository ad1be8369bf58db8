//! Names, one type per kind, each checked once when it is made (from a registry file, a
//! config file, a message or an InfluxDB answer) and then valid wherever it goes.
//!
//! | type | used for | rule |
//! |---|---|---|
//! | [`NodeName`] | clusters, nodes, collector ids, share groups | 1-64 of `A-Z a-z 0-9 . _ -` |
//! | [`Project`] | scheduler accounts, `_idle` | 1-64 of `A-Z a-z 0-9 . _ -` |
//! | [`User`] | user names, also `jane.doe@corp.example` | 1-128 of `A-Z a-z 0-9 . _ - @` |
//! | [`JobId`] | job ids, array (`12_3`) and het (`12+0`) jobs | 1-64 of `A-Z a-z 0-9 . _ - +` |
//! | [`GpuRef`] | a job's GPUs: index or UUID | 1-64 of `A-Z a-z 0-9 . _ -` |
//! | label ([`check_label`]) | hardware names: GPU models, sensor labels | 1-128 characters, no control character, no `\` |
//!
//! Every one of these is a valid InfluxDB tag value that reads back unchanged. The first
//! four are also valid MQTT topic levels and file names, and hold no quote, space, comma
//! or `=`, so no tenant can make its name collide with or reach into another's.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A name or label that breaks its rule; `Display` says which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} must be {rule}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl NameError {
    fn new(what: &'static str, v: &str, rule: &'static str) -> NameError {
        NameError {
            what,
            // Bounded, so a megabyte of junk does not become a megabyte of log line.
            value: v.chars().take(80).collect(),
            rule,
        }
    }
}

fn check(
    what: &'static str,
    rule: &'static str,
    max: usize,
    extra: &[char],
    v: &str,
) -> Result<(), NameError> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c)
        });
    if ok {
        Ok(())
    } else {
        Err(NameError::new(what, v, rule))
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal, $rule:literal, $max:expr, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// The rule, in words, for error messages and docs.
            pub const RULE: &'static str = $rule;

            pub fn new(v: impl Into<String>) -> Result<$ty, NameError> {
                let v = v.into();
                check($what, $rule, $max, $extra, &v)?;
                Ok($ty(v))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<$ty, NameError> {
                $ty::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<$ty, NameError> {
                $ty::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, o: &str) -> bool {
                self.0 == o
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, o: &&str) -> bool {
                self.0 == *o
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let s = String::deserialize(d)?;
                $ty::new(s).map_err(|e| serde::de::Error::custom(tagged(&e)))
            }
        }
    };
}

name_type!(
    /// A cluster or node name (also collector ids and share groups): an MQTT topic level.
    NodeName,
    "name",
    "1-64 characters of A-Z a-z 0-9 . _ -",
    64,
    &[]
);
name_type!(
    /// A project (scheduler account) billed for usage.
    Project,
    "project",
    "1-64 characters of A-Z a-z 0-9 . _ -",
    64,
    &[]
);
name_type!(
    /// A user name as directory services produce them (`alice`, `jane.doe@corp.example`).
    User,
    "user",
    "1-128 characters of A-Z a-z 0-9 . _ - @",
    128,
    &['@']
);
name_type!(
    /// A scheduler job id (Slurm: `1234`, array `1234_5`, heterogeneous `1234+0`).
    JobId,
    "job",
    "1-64 characters of A-Z a-z 0-9 . _ - +",
    64,
    &['+']
);

name_type!(
    /// A GPU held by a job, as the scheduler names it: an index, or a `GPU-`/`MIG-` UUID.
    GpuRef,
    "gpu",
    "1-64 characters of A-Z a-z 0-9 . _ -",
    64,
    &[]
);

impl Project {
    /// The project billed for what no job used.
    pub fn idle() -> Project {
        Project(crate::IDLE_PROJECT.to_string())
    }

    /// The project billed for energy whose owner cannot be known (a job that vanished
    /// from the registry without a recorded end).
    pub fn unattributed() -> Project {
        Project(crate::UNATTRIBUTED_PROJECT.to_string())
    }
}

/// Serde errors carry only text, so the reject reason travels as a prefix that
/// [`crate::check::reason_of_json`] reads back.
pub(crate) fn tagged(e: &dyn fmt::Display) -> String {
    format!("{}{e}", crate::check::NAME_TAG)
}

/// The rule of hardware labels in words.
pub const LABEL_RULE: &str = "1-128 characters without control characters or \\";

/// A hardware label (GPU model, sensor label, zone type): printable, bounded, and free of
/// `\`, which InfluxDB 1.x cannot store at the end of a tag value and does not unescape.
pub fn check_label(what: &'static str, v: &str) -> Result<(), NameError> {
    let ok = !v.is_empty()
        && v.chars().count() <= 128
        && !v.chars().any(|c| c.is_control() || c == '\\');
    if ok {
        Ok(())
    } else {
        Err(NameError::new(what, v, LABEL_RULE))
    }
}

/// A name read from hardware made into a label: control characters and backslashes
/// become `_`, at most 128 characters, `fallback` when nothing is left. One odd sysfs
/// label must not get a node's messages rejected.
pub fn clean_label(raw: &str, fallback: &str) -> String {
    let cleaned: String = raw
        .trim()
        .chars()
        .take(128)
        .map(|c| if c.is_control() || c == '\\' { '_' } else { c })
        .collect();
    if cleaned.is_empty() {
        fallback.to_string()
    } else {
        cleaned
    }
}

/// `deserialize_with` for label fields.
pub(crate) fn label<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_label("label", &s).map_err(|e| serde::de::Error::custom(tagged(&e)))?;
    Ok(s)
}

/// `deserialize_with` for optional label fields.
pub(crate) fn label_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(s) => {
            check_label("label", &s).map_err(|e| serde::de::Error::custom(tagged(&e)))?;
            Ok(Some(s))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_rule() {
        assert!(Project::new("proj-a.b_c").is_ok());
        assert!(User::new("jane.doe@corp.example").is_ok());
        assert!(Project::new("jane@corp").is_err(), "@ is for users only");
        assert!(JobId::new("1234_5").is_ok() && JobId::new("1234+0").is_ok());
        assert!(NodeName::new("gpu-node-017").is_ok());
        assert!(NodeName::new(&*"n".repeat(64)).is_ok());
        assert!(User::new(&*"u".repeat(128)).is_ok());
        for bad in [
            "",
            "x' OR \"project\" =~ /.*/ OR \"project\" = 'y",
            "o'brien",
            "a b",
            "a,b",
            "a=b",
            "a\nb",
            "a\\",
            "a/b",
            "+",
            "é",
            &"n".repeat(65),
        ] {
            assert!(Project::new(bad).is_err(), "{bad:?}");
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
            if bad != "+" {
                assert!(JobId::new(bad).is_err(), "{bad:?}");
            }
        }
        let e = Project::new("a b").unwrap_err().to_string();
        assert_eq!(
            e,
            "project \"a b\" must be 1-64 characters of A-Z a-z 0-9 . _ -"
        );
    }

    #[test]
    fn deserialising_checks_and_serialising_is_plain() {
        let p: Project = serde_json::from_str("\"proj-a\"").unwrap();
        assert_eq!(p, "proj-a");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"proj-a\"");
        let e = serde_json::from_str::<Project>("\"a'b\"").unwrap_err();
        assert!(e.to_string().contains("project \"a'b\" must be"), "{e}");
    }

    #[test]
    fn labels() {
        assert!(check_label("m", "NVIDIA H100 80GB HBM3, \"SXM\"=5").is_ok());
        for bad in ["", "a\nb", "tab\t", "end\\", "nul\0", &"x".repeat(129)] {
            assert!(check_label("m", bad).is_err(), "{bad:?}");
        }
        assert_eq!(clean_label("  Package id 0\n", "x"), "Package id 0");
        assert_eq!(clean_label("a\tb\\c\u{7}", "x"), "a_b_c_");
        assert_eq!(clean_label("   ", "fallback"), "fallback");
        assert_eq!(clean_label(&"y".repeat(300), "x").len(), 128);
        assert!(check_label("m", &clean_label(&"é".repeat(300), "x")).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn cleaned_labels_always_pass(raw in ".{0,300}") {
            proptest::prop_assert!(check_label("l", &clean_label(&raw, "x")).is_ok());
        }

        #[test]
        fn a_valid_name_round_trips_through_json(raw in "[A-Za-z0-9._@+ ,='\\\\-]{0,70}") {
            if let Ok(u) = User::new(raw.clone()) {
                let back: User = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
                proptest::prop_assert_eq!(back, u);
                proptest::prop_assert!(!raw.contains([' ', ',', '=', '\'', '\\']));
            }
        }
    }
}
