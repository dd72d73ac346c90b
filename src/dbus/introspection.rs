//! Compares introspection XML by interface, so `dbus/*.xml` can be checked
//! against what the daemon serves.

/// The `<interface name="…">` element named `interface` from `xml`, with
/// comments removed and whitespace normalised; `None` if it is not there.
pub fn normalized_interface(xml: &str, interface: &str) -> Option<String> {
    let open = format!("<interface name=\"{interface}\">");
    let start = xml.find(&open)?;
    let end = start + xml[start..].find("</interface>")? + "</interface>".len();
    let mut element = &xml[start..end];
    let mut without_comments = String::with_capacity(element.len());
    while let Some(comment) = element.find("<!--") {
        without_comments.push_str(&element[..comment]);
        let rest = &element[comment..];
        element = rest.find("-->").map_or("", |close| &rest[close + 3..]);
    }
    without_comments.push_str(element);
    let collapsed = without_comments
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    Some(collapsed.replace("> <", "><"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_whitespace_and_comments() {
        let a = "<node>\n  <interface name=\"x.Y\">\n <!-- doc -->\n <method name=\"A\">\n </method></interface></node>";
        let b = "<interface name=\"x.Y\"><method name=\"A\"></method></interface>";
        assert_eq!(
            normalized_interface(a, "x.Y"),
            normalized_interface(b, "x.Y")
        );
        assert_eq!(normalized_interface(a, "x.Z"), None);
    }
}
