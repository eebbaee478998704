use proptest::prelude::*;

use super::*;

const OPENAI: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15}}\n\n",
    "data: [DONE]\n\n",
);

const ANTHROPIC: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],",
    "\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":5,\"cache_creation_input_tokens\":0}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

fn scan(chunks: &[&[u8]]) -> UsageScanner {
    let mut scanner = UsageScanner::new();
    chunks.iter().for_each(|c| scanner.feed(c));
    scanner
}

fn usage(input: u64, cached_input: u64, output: u64) -> Option<Usage> {
    Some(Usage { input, cached_input, output })
}

/// A Responses stream whose completed event repeats `text` as the output.
fn responses(text: &str) -> String {
    let completed = serde_json::json!({
        "type": "response.completed",
        "sequence_number": 9,
        "response": {"id": "r", "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 7, "total_tokens": 47}},
    });
    format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"usage\":null}}}}\n\n\
         event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"x\"}}\n\n\
         event: response.completed\ndata: {completed}\n\n"
    )
}

#[test]
fn openai_final_usage_chunk() {
    let scanner = scan(&[OPENAI.as_bytes()]);
    assert_eq!((scanner.usage(), scanner.is_complete()), (usage(12, 0, 3), true));
}

#[test]
fn openai_without_include_usage_reports_nothing() {
    let without: String =
        OPENAI.lines().filter(|l| !l.contains("prompt_tokens")).map(|l| format!("{l}\n")).collect();
    let mut scanner = scan(&[without.as_bytes()]);
    scanner.finish();
    assert_eq!((scanner.usage(), scanner.is_complete()), (None, false));
}

#[test]
fn anthropic_start_then_cumulative_delta() {
    let start_only = &ANTHROPIC[..ANTHROPIC.find("event: content_block_start").unwrap()];
    let scanner = scan(&[start_only.as_bytes()]);
    assert_eq!((scanner.usage(), scanner.is_complete()), (usage(30, 5, 1), false));
    let scanner = scan(&[ANTHROPIC.as_bytes()]);
    assert_eq!((scanner.usage(), scanner.is_complete()), (usage(30, 5, 15), true));
}

/// A delta's `null` fields stand for "unchanged", and one that restates
/// the input without the cache counts leaves those as they were.
#[test]
fn anthropic_delta_fields_that_are_null_or_left_out_stand() {
    let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":\
        {\"input_tokens\":2000,\"cache_creation_input_tokens\":1000,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n";
    let delta = |usage: &str| {
        format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{usage}}}\n\n")
    };
    let nulls = delta(
        r#"{"input_tokens":null,"cache_creation_input_tokens":null,"cache_read_input_tokens":null,"output_tokens":7}"#,
    );
    let restated = delta(r#"{"input_tokens":2000,"output_tokens":9}"#);
    let full = delta(
        r#"{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":5,"output_tokens":3}"#,
    );
    for (delta, expected) in
        [(nulls, usage(3000, 0, 7)), (restated, usage(3000, 0, 9)), (full, usage(15, 5, 3))]
    {
        let scanner = scan(&[start.as_bytes(), delta.as_bytes()]);
        assert_eq!((scanner.usage(), scanner.is_complete()), (expected, true), "{delta}");
    }
}

#[test]
fn responses_completed_event() {
    let scanner = scan(&[responses("short").as_bytes()]);
    assert_eq!((scanner.usage(), scanner.is_complete()), (usage(40, 0, 7), true));
}

#[test]
fn an_overlong_event_keeps_its_usage_and_bounded_memory() {
    let stream = responses(&"word \\\"usage\\\": {} ".repeat(50_000));
    let mut scanner = UsageScanner::new();
    for chunk in stream.as_bytes().chunks(1000) {
        scanner.feed(chunk);
        assert!(scanner.line.len() <= MAX_EVENT_BYTES + 1000);
        assert!(scanner.data.head.len() <= MAX_EVENT_BYTES + 1000);
        assert!(scanner.data.tail.len() <= 2 * MAX_EVENT_BYTES + 1000);
    }
    assert_eq!((scanner.usage(), scanner.is_complete()), (usage(40, 0, 7), true));
}

#[test]
fn overlong_lines_that_are_not_data_are_skipped() {
    let long = format!(": {}\ndata: {{\"usage\":{{\"prompt_tokens\":1}}}}\n\n", "data: ".repeat(30_000));
    assert_eq!(scan(&[long.as_bytes()]).usage(), usage(1, 0, 0));
}

#[test]
fn line_endings_and_multiline_data() {
    let crlf = OPENAI.replace('\n', "\r\n");
    assert_eq!(scan(&[crlf.as_bytes()]).usage(), usage(12, 0, 3));
    let cr = ANTHROPIC.replace('\n', "\r");
    assert_eq!(scan(&[cr.as_bytes()]).usage(), usage(30, 5, 15));
    // A CRLF split between chunks is one line end, not two (which would end the event).
    let split = "data: {\"usage\":\r\ndata: {\"prompt_tokens\":2}}\r\n\r\n";
    assert_eq!(scan(&[&split.as_bytes()[..16], &split.as_bytes()[16..]]).usage(), usage(2, 0, 0));
    let multiline = "data: {\"usage\":\ndata: {\"prompt_tokens\":2}}\n\n";
    assert_eq!(scan(&[multiline.as_bytes()]).usage(), usage(2, 0, 0));
}

#[test]
fn an_unterminated_last_event_counts_after_finish() {
    let body = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}";
    let mut scanner = scan(&[body.as_bytes()]);
    assert_eq!(scanner.usage(), None);
    scanner.finish();
    assert_eq!(scanner.usage(), usage(4, 0, 2));
}

proptest! {
    #[test]
    fn chunk_boundaries_do_not_matter(
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        which in 0usize..3,
    ) {
        let (stream, want) = match which {
            0 => (OPENAI.to_string(), usage(12, 0, 3)),
            1 => (ANTHROPIC.replace('\n', "\r\n"), usage(30, 5, 15)),
            _ => (responses(&"long ".repeat(20_000)), usage(40, 0, 7)),
        };
        let bytes = stream.as_bytes();
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        let mut scanner = UsageScanner::new();
        for pair in at.windows(2) {
            scanner.feed(&bytes[pair[0]..pair[1]]);
        }
        prop_assert_eq!(scanner.usage(), want);
        prop_assert!(scanner.is_complete());
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
        let mut scanner = UsageScanner::new();
        chunks.iter().for_each(|c| scanner.feed(c));
        scanner.finish();
    }
}
