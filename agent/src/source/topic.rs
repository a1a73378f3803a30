//! Topic templates: how an MQTT topic names the device, the metric and tags.
//!
//! Sensors put identity in the topic (`site/berlin/dev/dev-7/temp`). A template such as
//! `site/{site}/dev/{device}/{metric}` is compiled once into a matcher; every incoming topic is
//! then matched level by level without allocating (up to four tags are held inline). The same
//! template derives the MQTT subscription filter (`site/+/dev/+/+`), so users write the shape
//! once.
//!
//! Rules:
//! - A level is a literal (matched exactly), a placeholder `{name}` filling the whole level,
//!   `+` or `{_}` (any single level, ignored), or `#` as the last level (any number of remaining
//!   levels, ignored).
//! - `{device}` is required: every reading must belong to a device. `{metric}` is optional; without
//!   it the metric comes from the payload (JSON field names, SenML names, line-protocol fields).
//!   Any other placeholder name becomes a tag.
//! - Placeholders do not match empty levels (an empty device id is not an id), and, as in MQTT,
//!   wildcard-like first levels do not match topics starting with `$` (broker-internal topics).

use thiserror::Error;

/// A template that does not compile, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    #[error("topic template is empty; write one like `site/{{site}}/dev/{{device}}/{{metric}}`")]
    Empty,
    #[error("topic template `{template}`: level {level_number} `{level}` mixes a placeholder or wildcard with other text; a placeholder, `+` or `#` must fill a whole level")]
    PartialLevel {
        template: String,
        level_number: usize,
        level: String,
    },
    #[error("topic template `{template}`: placeholder `{{{name}}}` has an invalid name; use letters, digits and `_`")]
    BadPlaceholderName { template: String, name: String },
    #[error("topic template `{template}`: placeholder `{{{name}}}` appears twice; each name may be used once")]
    DuplicatePlaceholder { template: String, name: String },
    #[error("topic template `{template}`: `#` may only be the last level")]
    HashNotLast { template: String },
    #[error("topic template `{template}` has no `{{device}}` placeholder; every reading needs a device id from the topic")]
    MissingDevice { template: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Metric,
    Tag(String),
    AnyOne,
}

/// A compiled topic template. See the module documentation for the syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    levels: Vec<Level>,
    any_tail: bool,
    subscription_filter: String,
}

/// What a topic said about a reading. Borrows from the template (tag names) and the topic (values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFields<'a> {
    pub device_id: &'a str,
    pub metric: Option<&'a str>,
    /// Tag (name, value) pairs in template order.
    pub tags: TopicTags<'a>,
}

/// Tags inline up to this many (every template we have seen), on the heap beyond.
const INLINE_TAGS: usize = 4;

/// A topic's tags without an allocation per message for the usual few (every message is
/// matched, so a `Vec` here was one allocation per reading of a plain-number feed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicTags<'a> {
    Inline {
        pairs: [(&'a str, &'a str); INLINE_TAGS],
        len: usize,
    },
    Heap(Vec<(&'a str, &'a str)>),
}

impl Default for TopicTags<'_> {
    fn default() -> Self {
        Self::Inline {
            pairs: [("", ""); INLINE_TAGS],
            len: 0,
        }
    }
}

impl<'a> TopicTags<'a> {
    pub fn push(&mut self, tag: (&'a str, &'a str)) {
        match self {
            Self::Inline { pairs, len } => match pairs.get_mut(*len) {
                Some(slot) => {
                    *slot = tag;
                    *len += 1;
                }
                None => {
                    let mut heap = pairs.to_vec();
                    heap.push(tag);
                    *self = Self::Heap(heap);
                }
            },
            Self::Heap(tags) => tags.push(tag),
        }
    }

    pub fn as_slice(&self) -> &[(&'a str, &'a str)] {
        match self {
            Self::Inline { pairs, len } => pairs.get(..*len).unwrap_or_default(),
            Self::Heap(tags) => tags,
        }
    }
}

impl<'a> std::ops::Deref for TopicTags<'a> {
    type Target = [(&'a str, &'a str)];

    fn deref(&self) -> &Self::Target {
        self.as_slice()
    }
}

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        let raw_levels: Vec<&str> = template.split('/').collect();
        let mut levels = Vec::with_capacity(raw_levels.len());
        let mut any_tail = false;
        let mut seen_names: Vec<&str> = Vec::new();
        let mut filter_levels: Vec<&str> = Vec::with_capacity(raw_levels.len());
        for (index, raw) in raw_levels.iter().enumerate() {
            let is_last = index + 1 == raw_levels.len();
            if *raw == "#" {
                if !is_last {
                    return Err(TemplateError::HashNotLast {
                        template: template.to_owned(),
                    });
                }
                any_tail = true;
                filter_levels.push("#");
                continue;
            }
            if *raw == "+" {
                levels.push(Level::AnyOne);
                filter_levels.push("+");
                continue;
            }
            let level = if let Some(name) = raw
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'))
            {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(TemplateError::BadPlaceholderName {
                        template: template.to_owned(),
                        name: name.to_owned(),
                    });
                }
                if name != "_" {
                    if seen_names.contains(&name) {
                        return Err(TemplateError::DuplicatePlaceholder {
                            template: template.to_owned(),
                            name: name.to_owned(),
                        });
                    }
                    seen_names.push(name);
                }
                filter_levels.push("+");
                match name {
                    "_" => Level::AnyOne,
                    "device" => Level::Device,
                    "metric" => Level::Metric,
                    other => Level::Tag(other.to_owned()),
                }
            } else {
                if raw.contains(['{', '}', '+', '#']) {
                    return Err(TemplateError::PartialLevel {
                        template: template.to_owned(),
                        level_number: index + 1,
                        level: (*raw).to_owned(),
                    });
                }
                filter_levels.push(raw);
                Level::Literal((*raw).to_owned())
            };
            levels.push(level);
        }
        if !levels.contains(&Level::Device) {
            return Err(TemplateError::MissingDevice {
                template: template.to_owned(),
            });
        }
        Ok(Self {
            template: template.to_owned(),
            levels,
            any_tail,
            subscription_filter: filter_levels.join("/"),
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The MQTT subscription filter that receives every topic this template can match.
    pub fn subscription_filter(&self) -> &str {
        &self.subscription_filter
    }

    /// Whether the topic names the metric (otherwise the payload must).
    pub fn has_metric(&self) -> bool {
        self.levels.contains(&Level::Metric)
    }

    /// Matches a topic; `None` if the topic does not have this template's shape.
    ///
    /// Every message's topic goes through here, so it works on bytes: a literal level is
    /// compared in place (no search for its end), a placeholder's end is found by
    /// [`find_slash`], and the tag list is written only for tag levels. Levels are what
    /// `topic.split('/')` gives (`a//b` has an empty middle level).
    pub fn match_topic<'a>(&'a self, topic: &'a str) -> Option<TopicFields<'a>> {
        let bytes = topic.as_bytes();
        // Start of the next level; past the end once the topic's last level is taken.
        let mut start = 0usize;
        let mut device_id = None;
        let mut metric = None;
        let mut tags = TopicTags::default();
        for (index, level) in self.levels.iter().enumerate() {
            let rest = bytes.get(start..)?;
            let end = match level {
                Level::Literal(literal) => {
                    let end = start + literal.len();
                    if !rest.starts_with(literal.as_bytes())
                        || bytes.get(end).is_some_and(|byte| *byte != b'/')
                    {
                        return None;
                    }
                    end
                }
                _ => find_slash(rest).map_or(bytes.len(), |slash| start + slash),
            };
            // `start` and `end` are at the topic's ends or next to an ASCII `/`: both are
            // character boundaries, so this never fails on a valid match.
            let value = topic.get(start..end)?;
            start = end + 1;
            if index == 0 && value.starts_with('$') && !matches!(level, Level::Literal(_)) {
                return None;
            }
            match level {
                Level::Literal(_) | Level::AnyOne => {}
                Level::Device | Level::Metric | Level::Tag(_) if value.is_empty() => return None,
                Level::Device => device_id = Some(value),
                Level::Metric => metric = Some(value),
                Level::Tag(name) => tags.push((name.as_str(), value)),
            }
        }
        if self.any_tail {
            // `a/#` also matches `a` itself in MQTT; the tail is ignored either way.
            if self.levels.is_empty() && topic.starts_with('$') {
                return None;
            }
        } else if start <= bytes.len() {
            // The topic has more levels than the template.
            return None;
        }
        Some(TopicFields {
            device_id: device_id?,
            metric,
            tags,
        })
    }
}

/// Position of the first `/` in `bytes`, eight bytes at a time: topic levels are short, but
/// every placeholder level of every message's topic is searched.
fn find_slash(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    const SLASHES: u64 = ONES * b'/' as u64;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0usize;
    for chunk in &mut chunks {
        let Ok(eight) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // Bytes equal to `/` become zero; the lowest flagged byte is the first zero byte
        // (flags above a zero byte can be false, below it never are).
        let word = u64::from_le_bytes(eight) ^ SLASHES;
        let zero_bytes = word.wrapping_sub(ONES) & !word & HIGH_BITS;
        if zero_bytes != 0 {
            return Some(offset + (zero_bytes.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|byte| *byte == b'/')
        .map(|position| offset + position)
}

impl std::fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_levels_and_derives_filter() {
        let template = TopicTemplate::parse("site/{site}/dev/{device}/{metric}").unwrap();
        assert_eq!(template.subscription_filter(), "site/+/dev/+/+");
        let fields = template.match_topic("site/berlin/dev/dev-7/temp").unwrap();
        assert_eq!(fields.device_id, "dev-7");
        assert_eq!(fields.metric, Some("temp"));
        assert_eq!(fields.tags.as_slice(), [("site", "berlin")]);
        assert!(template.match_topic("site/berlin/dev/dev-7").is_none());
        assert!(template
            .match_topic("site/berlin/dev/dev-7/temp/x")
            .is_none());
        assert!(template
            .match_topic("site/berlin/device/dev-7/temp")
            .is_none());
        assert!(template.match_topic("site/berlin/dev//temp").is_none());
    }

    #[test]
    fn many_tags_keep_template_order() {
        let template = TopicTemplate::parse("{a}/{b}/{c}/{d}/{e}/{f}/{device}/{metric}").unwrap();
        let fields = template.match_topic("1/2/3/4/5/6/dev/m").unwrap();
        assert_eq!(
            fields.tags.as_slice(),
            [
                ("a", "1"),
                ("b", "2"),
                ("c", "3"),
                ("d", "4"),
                ("e", "5"),
                ("f", "6")
            ]
        );
        let fields = template.match_topic("1/2/3/4/5/6/dev/m").unwrap();
        assert_eq!(&fields.tags[..2], [("a", "1"), ("b", "2")]);
    }

    #[test]
    fn find_slash_finds_the_first_slash() {
        for text in [
            "",
            "/",
            "a",
            "a/",
            "/a",
            "a//b",
            "site/berlin/dev/dev-7/temp",
            "ä/ö/",
            "0123456/",
            "01234567/",
            "012345678/",
            "0123456789abcdef/x/",
            "no slash in these twenty-four bytes",
            "\u{2f}\u{ff}/",
            "é/",
        ] {
            assert_eq!(
                find_slash(text.as_bytes()),
                text.bytes().position(|byte| byte == b'/'),
                "text `{text}`"
            );
        }
        // Every byte value next to and around a slash, at every position of a word.
        for position in 0..20 {
            for filler in [0u8, 0x2e, 0x2f ^ 0x80, 0x30, 0xaf, 0xff] {
                let mut bytes = vec![filler; 20];
                if let Some(slot) = bytes.get_mut(position) {
                    *slot = b'/';
                }
                let expected = bytes.iter().position(|byte| *byte == b'/');
                assert_eq!(
                    find_slash(&bytes),
                    expected,
                    "slash at {position}, filler {filler:#x}"
                );
            }
        }
    }

    /// Device, metric and tags of a matched topic.
    type Matched<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>);

    /// The matcher as the rules state it, on `str::split`: what `match_topic` must agree with.
    fn reference_match<'a>(template: &'a TopicTemplate, topic: &'a str) -> Option<Matched<'a>> {
        let mut values = topic.split('/');
        let mut device = None;
        let mut metric = None;
        let mut tags = Vec::new();
        for (index, level) in template.levels.iter().enumerate() {
            let value = values.next()?;
            if index == 0 && value.starts_with('$') && !matches!(level, Level::Literal(_)) {
                return None;
            }
            match level {
                Level::Literal(literal) if literal != value => return None,
                Level::Literal(_) | Level::AnyOne => {}
                _ if value.is_empty() => return None,
                Level::Device => device = Some(value),
                Level::Metric => metric = Some(value),
                Level::Tag(name) => tags.push((name.as_str(), value)),
            }
        }
        if !template.any_tail && values.next().is_some() {
            return None;
        }
        Some((device?, metric, tags))
    }

    #[test]
    fn byte_matching_agrees_with_splitting() {
        let templates = [
            "site/{site}/dev/{device}/{metric}",
            "tbench/{site}/{device}/{metric}",
            "{device}/{metric}",
            "+/sensors/{device}/#",
            "a/{device}",
            "a/b/{device}/{_}/{metric}",
        ];
        let topics = [
            "",
            "/",
            "site/berlin/dev/dev-7/temp",
            "site/berlin/dev/dev-7/temp/",
            "site/berlin/dev/dev-7",
            "site//dev/dev-7/temp",
            "sites/berlin/dev/dev-7/temp",
            "site/berlin/devs/dev-7/temp",
            "site/berlin/de/dev-7/temp",
            "tbench/site-03/dev-0042/temperature",
            "tbench/site-03/dev-0042/temperature/x",
            "tbench/site-03/dev-0042",
            "tbenchx/site-03/dev-0042/temperature",
            "d/m",
            "d/m/",
            "/m",
            "d/",
            "$SYS/m",
            "$SYS/sensors/d1",
            "x/sensors/d1",
            "x/sensors/d1/a/b",
            "x/sensors/",
            "x/sensors",
            "a",
            "a/",
            "a/d",
            "a/d/e",
            "a/b/d/any/m",
            "a/b/d//m",
            "a/b/ä/ö/ü",
        ];
        for template_text in templates {
            let template = TopicTemplate::parse(template_text).unwrap();
            for topic in topics {
                let matched = template
                    .match_topic(topic)
                    .map(|fields| (fields.device_id, fields.metric, fields.tags.to_vec()));
                assert_eq!(
                    matched,
                    reference_match(&template, topic),
                    "template `{template_text}`, topic `{topic}`"
                );
            }
        }
    }

    #[test]
    fn wildcards_and_tail() {
        let template = TopicTemplate::parse("+/sensors/{device}/#").unwrap();
        assert_eq!(template.subscription_filter(), "+/sensors/+/#");
        assert!(!template.has_metric());
        assert_eq!(
            template.match_topic("x/sensors/d1/a/b").unwrap().device_id,
            "d1"
        );
        assert_eq!(
            template.match_topic("x/sensors/d1").unwrap().device_id,
            "d1"
        );
        assert!(template.match_topic("$SYS/sensors/d1").is_none());
    }

    #[test]
    fn rejects_bad_templates() {
        assert_eq!(TopicTemplate::parse(""), Err(TemplateError::Empty));
        assert!(matches!(
            TopicTemplate::parse("a/{device}x"),
            Err(TemplateError::PartialLevel {
                level_number: 2,
                ..
            })
        ));
        assert!(matches!(
            TopicTemplate::parse("a/#/{device}"),
            Err(TemplateError::HashNotLast { .. })
        ));
        assert!(matches!(
            TopicTemplate::parse("a/{device}/{device}"),
            Err(TemplateError::DuplicatePlaceholder { .. })
        ));
        assert!(matches!(
            TopicTemplate::parse("a/{metric}"),
            Err(TemplateError::MissingDevice { .. })
        ));
        assert!(matches!(
            TopicTemplate::parse("a/{dev ice}"),
            Err(TemplateError::BadPlaceholderName { .. })
        ));
    }
}
