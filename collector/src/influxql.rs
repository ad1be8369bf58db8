//! Values placed into InfluxQL, escaped by one function each. Names reaching a query
//! are already typed (`nodewatt_wire::name`), but names read back from InfluxDB are
//! whatever was stored, so every value goes through here; no query is pasted together
//! from raw strings.

/// A string literal: `'...'` with `\` and `'` escaped.
pub fn string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if matches!(c, '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// An identifier (measurement, tag or field key): `"..."` with `\` and `"` escaped.
pub fn ident(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '\\' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"key" = 'value'`.
pub fn eq(key: &str, value: &str) -> String {
    format!("{} = {}", ident(key), string(value))
}

/// `("key" = 'a' OR "key" = 'b')`; `false` for no values (InfluxQL has no literal
/// false, so a condition nothing matches).
pub fn any_of(key: &str, values: &[String]) -> String {
    if values.is_empty() {
        return format!("{} = '' AND {} != ''", ident(key), ident(key));
    }
    let parts: Vec<String> = values.iter().map(|v| eq(key, v)).collect();
    format!("({})", parts.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_stay_inside_their_literal() {
        assert_eq!(string("proj-a"), "'proj-a'");
        assert_eq!(string("o'brien"), "'o\\'brien'");
        assert_eq!(
            string("x' OR \"project\" =~ /.*/ OR \"project\" = 'y"),
            "'x\\' OR \"project\" =~ /.*/ OR \"project\" = \\'y'"
        );
        assert_eq!(string("end\\"), "'end\\\\'");
        assert_eq!(ident("a\"b"), "\"a\\\"b\"");
        assert_eq!(eq("user", "o'brien"), "\"user\" = 'o\\'brien'");
        assert_eq!(
            any_of("node", &["n1".into(), "n'2".into()]),
            "(\"node\" = 'n1' OR \"node\" = 'n\\'2')"
        );
    }

    proptest::proptest! {
        /// Whatever the value, the literal is one token: it ends where it was closed.
        #[test]
        fn a_literal_ends_only_at_its_closing_quote(v in ".{0,40}") {
            let lit = string(&v);
            let bytes = lit.as_bytes();
            let mut i = 1;
            let mut closed_at = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'\'' => { closed_at = Some(i); break; }
                    _ => i += 1,
                }
            }
            proptest::prop_assert_eq!(closed_at, Some(bytes.len() - 1));
        }
    }
}
