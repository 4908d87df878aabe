//! The CRI container log format that kubelet reads and containerd's CRI writes (and
//! switchyardd's will): one line per chunk, `<RFC 3339 time> <stdout|stderr> <P|F> <text>`,
//! where `P` marks a partial line continued by the next chunk of the same stream and `F` ends
//! a line.

/// One whole line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The time of the line's last chunk, as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// The whole lines of a CRI log, partial chunks joined per stream. Lines not in the format are
/// skipped; a partial line the log ends in is left out (it has not ended yet).
pub fn parse(text: &str) -> Vec<LogLine> {
    let mut out = Vec::new();
    let mut pending: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !matches!(tag, "P" | "F") {
            continue;
        }
        let chunk = parts.next().unwrap_or("");
        let i = match pending.iter().position(|(s, _)| s == stream) {
            Some(i) => i,
            None => {
                pending.push((stream.to_owned(), String::new()));
                pending.len() - 1
            }
        };
        pending[i].1.push_str(chunk);
        if tag == "F" {
            let (stream, text) = pending.swap_remove(i);
            out.push(LogLine {
                time: time.to_owned(),
                stream,
                text,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_partial_chunks_per_stream_and_skips_what_is_not_a_log_line() {
        let log = "\
2026-12-04T10:00:00.1Z stdout P hel
2026-12-04T10:00:00.2Z stderr F oops
2026-12-04T10:00:00.3Z stdout F lo
not a log line
2026-12-04T10:00:00.4Z stdout X weird
2026-12-04T10:00:00.5Z stdout F 
2026-12-04T10:00:00.6Z stdout P unfinished";
        let got = parse(log);
        let lines: Vec<(&str, &str)> = got
            .iter()
            .map(|l| (l.stream.as_str(), l.text.as_str()))
            .collect();
        assert_eq!(
            lines,
            [("stderr", "oops"), ("stdout", "hello"), ("stdout", "")]
        );
        assert_eq!(got[1].time, "2026-12-04T10:00:00.3Z");
    }
}
