//! The one table renderer for every listing: aligned columns, a dash for an
//! empty cell, and a legend.

use std::fmt::Write;

/// Renders `rows` under `header`, left-aligned, two spaces between columns,
/// then a blank line and `legend`.
pub(crate) fn render(header: &[&str], rows: &[Vec<String>], legend: &str) -> String {
    let cell = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            text.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|text| cell(text)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in &rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (index, value) in cells.enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            let width = widths.get(index).copied().unwrap_or(0);
            let _ = write!(text, "{value:<width$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out.push('\n');
    out.push_str(legend);
    out.push('\n');
    out
}

/// `"N machines listed."` with the right number.
pub(crate) fn legend(count: usize) -> String {
    match count {
        1 => "1 machine listed.".to_owned(),
        n => format!("{n} machines listed."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_dashes() {
        let rows = vec![
            vec!["web".to_owned(), "running".to_owned(), "1234".to_owned()],
            vec!["database".to_owned(), "stopped".to_owned(), String::new()],
        ];
        let text = render(&["MACHINE", "STATE", "LEADER"], &rows, &legend(2));
        assert_eq!(
            text,
            "MACHINE   STATE    LEADER\n\
             web       running  1234\n\
             database  stopped  -\n\
             \n\
             2 machines listed.\n"
        );
        assert_eq!(legend(1), "1 machine listed.");
        assert_eq!(render(&["A"], &[], &legend(0)), "A\n\n0 machines listed.\n");
    }
}
