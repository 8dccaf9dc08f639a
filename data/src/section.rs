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

/// One key of a section: its TOML name and its doc comment (one line per `///` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    pub key: &'static str,
    pub doc: &'static str,
}

/// A config section declared with [`config_section!`].
pub trait Section: Default + serde::Serialize {
    /// The keys in declaration order.
    const KEYS: &'static [KeyDoc];
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
                $fvis:vis $field:ident : $ty:ty = $default:expr
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
                $($crate::section::KeyDoc { key: stringify!($field), doc: concat!($($doc, "\n",)*) },)*
            ];
        }
    };
}

#[cfg(test)]
mod tests {
    use super::Section;

    crate::config_section! {
        /// A section for the test.
        pub struct Example {
            /// A count.
            /// Second line.
            pub count: u64 = 1 << 4,
            /// A name.
            pub name: String = "x",
            /// A list.
            pub list: Vec<f64> = vec![0.5],
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
}
