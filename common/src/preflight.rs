//! The lines `check` prints, in the agent and the collector alike: what was checked, a
//! status, and what was found or what is wrong. Operators' scripts and the tests read
//! these columns, so both tools print them here.

use std::process::ExitCode;

/// A `check`'s output so far: how many lines said something is wrong.
#[derive(Debug, Default)]
pub struct Preflight {
    problems: usize,
}

impl Preflight {
    /// Prints one line; any `status` but `ok` is a problem.
    pub fn line(&mut self, name: &str, status: &str, text: &str) {
        if status != "ok" {
            self.problems += 1;
        }
        println!("{}", format_line(name, status, text));
    }

    /// `ok` with what was found, or `PROBLEM` with what is wrong.
    pub fn finding(&mut self, name: &str, result: &Result<String, String>) {
        match result {
            Ok(found) => self.line(name, "ok", found),
            Err(wrong) => self.line(name, "PROBLEM", wrong),
        }
    }

    /// 1 with `--strict` after any problem, else success.
    pub fn exit_code(&self, strict: bool) -> ExitCode {
        if strict && self.problems > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn format_line(name: &str, status: &str, text: &str) -> String {
    format!("{name:<10} {status:<12} {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_columns_and_count_problems() {
        assert_eq!(
            format_line("broker", "ok", "x"),
            "broker     ok           x"
        );
        assert_eq!(
            format_line("influxdb", "PROBLEM", "y"),
            "influxdb   PROBLEM      y"
        );
        let mut p = Preflight::default();
        p.finding("a", &Ok("fine".into()));
        assert_eq!(p.exit_code(true), ExitCode::SUCCESS);
        p.line("", "UNREADABLE", "z");
        assert_eq!(p.exit_code(false), ExitCode::SUCCESS);
        assert_eq!(p.exit_code(true), ExitCode::from(1));
    }
}
