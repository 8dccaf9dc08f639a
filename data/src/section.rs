//! Config sections declared once: each key with its doc comment and its default, side by side.
//!
//! [`config_section!`] turns one declaration per TOML section into the struct (strict serde: an
//! unknown key is an error, a missing key takes its default), its `impl Default`, and the key
//! reference ([`Section::KEYS`]) from which `trainer config-docs` prints the tables the README
//! shows, so a default or a description cannot differ between the code, `--help`-style output and
//! the docs. burn's `#[derive(Config)]` with `#[config(default = …)]` is the model.
//!
//! ```
//! ferroclip_data::config_section! {
//!     /// `[log]`
//!     pub struct LogConfig {
//!         /// Log every N optimizer steps.
//!         pub every_steps: u64 = 10,
//!         /// Where the logs go.
//!         pub dir: String = "logs",
//!     }
//! }
//! use ferroclip_data::section::Section;
//! assert_eq!(LogConfig::default().dir, "logs");
//! assert_eq!(LogConfig::KEYS[0].key, "every_steps");
//! ```

use std::path::PathBuf;

/// One key of a section: its TOML name, its doc comment (one line per `///` line), its Rust type
/// as written, and the values it accepts when they are not every value of that type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyDoc {
    pub key: &'static str,
    pub doc: &'static str,
    pub ty: &'static str,
    pub range: Option<Range>,
}

/// A config section declared with [`config_section!`].
pub trait Section: Default + serde::Serialize {
    /// The keys in declaration order.
    const KEYS: &'static [KeyDoc];

    /// Every key's value against its declared [`Range`]: the first key outside its range, and why.
    fn check_ranges(&self) -> Result<(), KeyError>;
}

/// A key whose value is outside its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

/// One end of a [`Range`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    Unbounded,
    Inclusive(f64),
    Exclusive(f64),
}

/// The numbers a key accepts, declared beside its default (`pub eps: f64 = 1e-8 => Range::positive()`):
/// finite and between two bounds. For a list, every element; for an `Option`, the value when set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: Bound,
    pub max: Bound,
}

impl Range {
    /// `[min, max]`
    pub const fn closed(min: f64, max: f64) -> Range {
        Range { min: Bound::Inclusive(min), max: Bound::Inclusive(max) }
    }
    /// `[min, max)`, e.g. a rate that must stay below 1.
    pub const fn below(min: f64, max: f64) -> Range {
        Range { min: Bound::Inclusive(min), max: Bound::Exclusive(max) }
    }
    /// `[min, ∞)`
    pub const fn at_least(min: f64) -> Range {
        Range { min: Bound::Inclusive(min), max: Bound::Unbounded }
    }
    /// `(0, ∞)`
    pub const fn positive() -> Range {
        Range { min: Bound::Exclusive(0.0), max: Bound::Unbounded }
    }
    /// `(0, max]`
    pub const fn positive_to(max: f64) -> Range {
        Range { min: Bound::Exclusive(0.0), max: Bound::Inclusive(max) }
    }

    /// Whether `v` is finite and within both bounds.
    pub fn contains(&self, v: f64) -> bool {
        let above = match self.min {
            Bound::Unbounded => true,
            Bound::Inclusive(m) => v >= m,
            Bound::Exclusive(m) => v > m,
        };
        let below = match self.max {
            Bound::Unbounded => true,
            Bound::Inclusive(m) => v <= m,
            Bound::Exclusive(m) => v < m,
        };
        v.is_finite() && above && below
    }
}

impl std::fmt::Display for Range {
    /// Interval notation, as the docs show it: `[0, 1)`, `(0, inf)`, `[1, 1048576]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.min {
            Bound::Unbounded => write!(f, "(-inf")?,
            Bound::Inclusive(m) => write!(f, "[{m}")?,
            Bound::Exclusive(m) => write!(f, "({m}")?,
        }
        match self.max {
            Bound::Unbounded => write!(f, ", inf)"),
            Bound::Inclusive(m) => write!(f, ", {m}]"),
            Bound::Exclusive(m) => write!(f, ", {m})"),
        }
    }
}

/// A value that can be held against a [`Range`]: numbers, and lists or options of them.
pub trait InRange {
    /// `Err` with the reason when the value (or an element of it) is outside `range`.
    fn check_range(&self, range: &Range) -> Result<(), String>;
}

macro_rules! in_range_as_f64 {
    ($($t:ty),*) => {$(
        impl InRange for $t {
            fn check_range(&self, range: &Range) -> Result<(), String> {
                match range.contains(*self as f64) {
                    true => Ok(()),
                    false => Err(format!("{self} is outside {range}")),
                }
            }
        }
    )*};
}
in_range_as_f64!(f64, f32, u64, u32, usize, i64, i32);

impl<T: InRange> InRange for Option<T> {
    fn check_range(&self, range: &Range) -> Result<(), String> {
        self.as_ref().map_or(Ok(()), |v| v.check_range(range))
    }
}

impl<T: InRange> InRange for [T] {
    fn check_range(&self, range: &Range) -> Result<(), String> {
        for (i, v) in self.iter().enumerate() {
            v.check_range(range).map_err(|e| format!("element {i}: {e}"))?;
        }
        Ok(())
    }
}

impl<T: InRange, const N: usize> InRange for [T; N] {
    fn check_range(&self, range: &Range) -> Result<(), String> {
        self.as_slice().check_range(range)
    }
}

impl<T: InRange> InRange for Vec<T> {
    fn check_range(&self, range: &Range) -> Result<(), String> {
        self.as_slice().check_range(range)
    }
}

/// The declared range of a key, if any (what `$(=> range)?` expands to in [`config_section!`]).
pub const fn declared(range: &[Range]) -> Option<Range> {
    match range {
        [r] => Some(*r),
        _ => None,
    }
}

/// A default as written in a declaration, turned into the field's type: `"txt"` for a `String` or
/// a `PathBuf`, anything else as is (so integer literals take the field's integer type).
pub trait IntoDefault<T> {
    fn into_default(self) -> T;
}

impl<T> IntoDefault<T> for T {
    fn into_default(self) -> T {
        self
    }
}

impl IntoDefault<String> for &str {
    fn into_default(self) -> String {
        self.to_string()
    }
}

impl IntoDefault<PathBuf> for &str {
    fn into_default(self) -> PathBuf {
        PathBuf::from(self)
    }
}

/// Declares a config section; see the [module docs](self). Each field is
/// `/// doc` + optional `#[serde(...)]` (not `rename`: the key is the field's name) +
/// `pub name: Type = default`.
#[macro_export]
macro_rules! config_section {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[serde($($serde:tt)*)])*
                $fvis:vis $field:ident : $ty:ty = $default:expr $(=> $range:expr)?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        $vis struct $name {
            $(
                $(#[doc = $doc])*
                #[doc = ""]
                #[doc = concat!("Default: `", stringify!($default), "`.")]
                $(#[doc = concat!("Range: `", stringify!($range), "`.")])?
                $(#[serde($($serde)*)])*
                $fvis $field: $ty,
            )*
        }

        impl ::std::default::Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $crate::section::IntoDefault::<$ty>::into_default($default),)*
                }
            }
        }

        impl $crate::section::Section for $name {
            const KEYS: &'static [$crate::section::KeyDoc] = &[
                $($crate::section::KeyDoc {
                    key: stringify!($field),
                    doc: concat!($($doc, "\n",)*),
                    ty: stringify!($ty),
                    range: $crate::section::declared(&[$($range)?]),
                },)*
            ];

            fn check_ranges(&self) -> ::std::result::Result<(), $crate::section::KeyError> {
                $($(
                    $crate::section::InRange::check_range(&self.$field, &$range).map_err(|message| {
                        $crate::section::KeyError { key: stringify!($field), message }
                    })?;
                )?)*
                Ok(())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{KeyError, Range, Section};

    crate::config_section! {
        /// A section for the test.
        pub struct Example {
            /// A count.
            /// Second line.
            pub count: u64 = 1 << 4,
            /// A name.
            pub name: String = "x",
            /// A list.
            pub list: Vec<f64> = vec![0.5] => Range::below(0.0, 1.0),
            /// A flag whose serde attribute passes through.
            #[serde(alias = "other")]
            pub flag: bool = true,
        }
    }

    #[test]
    fn defaults_docs_and_strict_keys_come_from_one_declaration() {
        let d = Example::default();
        assert_eq!((d.count, d.name.as_str(), d.list.as_slice(), d.flag), (16, "x", [0.5].as_slice(), true));
        let keys: Vec<&str> = Example::KEYS.iter().map(|k| k.key).collect();
        assert_eq!(keys, ["count", "name", "list", "flag"]);
        assert_eq!(Example::KEYS[0].doc, " A count.\n Second line.\n");
        let parsed: Example = serde_json::from_str(r#"{"name": "y", "other": false}"#).unwrap();
        assert_eq!((parsed.count, parsed.name.as_str(), parsed.flag), (16, "y", false));
        let err = serde_json::from_str::<Example>(r#"{"nmae": "y"}"#).unwrap_err().to_string();
        assert!(err.contains("nmae"), "{err}");
    }

    #[test]
    fn ranges_are_declared_with_the_key_and_checked_on_the_value() {
        assert_eq!(Example::KEYS[2].range, Some(Range::below(0.0, 1.0)));
        assert_eq!(Example::KEYS[0].range, None);
        assert_eq!((Example::KEYS[0].ty, Example::KEYS[2].ty), ("u64", "Vec<f64>"));
        assert_eq!(Range::below(0.0, 1.0).to_string(), "[0, 1)");
        assert_eq!(Range::positive().to_string(), "(0, inf)");
        assert!(Example::default().check_ranges().is_ok());
        for bad in [1.0, -0.1, f64::NAN, f64::INFINITY] {
            let e = Example { list: vec![0.5, bad], ..Default::default() }.check_ranges().unwrap_err();
            assert_eq!(e.key, "list");
            assert!(e.message.contains("element 1") && e.message.contains("[0, 1)"), "{e:?}");
        }
        let ok = Example { list: vec![0.0, 0.999], ..Default::default() };
        assert_eq!(ok.check_ranges(), Ok::<(), KeyError>(()));
        assert!(Range::closed(1.0, 4.0).contains(4.0) && !Range::positive().contains(0.0));
        assert!(Range::positive_to(1.0).contains(1.0) && !Range::at_least(2.0).contains(1.5));
    }
}
