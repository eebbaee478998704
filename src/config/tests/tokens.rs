//! Token quotas: `tokens`, `input_tokens`, `output_tokens` and their settings.

use super::*;

fn upstream_with(keys: &str) -> Result<Config, ConfigError> {
    parse_str(&format!("{MINIMAL}{keys}"))
}

fn tokens_of(keys: &str) -> Option<Tokens> {
    let config = upstream_with(keys).unwrap_or_else(|e| panic!("{e}"));
    config.upstreams.into_iter().next().expect("one upstream").tokens
}

#[test]
fn token_quotas_parse_as_documented() {
    let tokens = tokens_of("tokens = \"30000/min\"\n").expect("a token quota");
    assert_eq!(tokens.quotas, [(TokenKind::Total, vec![parse_rate("30000/min").unwrap()])]);
    assert_eq!(tokens.default_max_tokens, 4096, "the documented default");
    assert_eq!(tokens.accounting, TokenAccounting::Usage);

    let tokens = tokens_of(
        "output_tokens = \"8000/min\"\ninput_tokens = [\"20000/min\", \"1000000/d\"]\n\
         default_max_tokens = 1024\ntoken_accounting = \"reserved\"\n",
    )
    .expect("token quotas");
    let kinds: Vec<TokenKind> = tokens.quotas.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, [TokenKind::Input, TokenKind::Output], "in a fixed order, whatever the file's");
    assert_eq!(tokens.quotas[0].1.len(), 2);
    assert_eq!((tokens.default_max_tokens, tokens.accounting), (1024, TokenAccounting::Reserved));
    assert_eq!(tokens_of(""), None, "no token quotas by default");
}

#[test]
fn token_settings_are_validated_where_they_are_written() {
    assert_error(&format!("{MINIMAL}tokens = []\n"), 6, 10, &["tokens needs at least one quota"]);
    assert_error(&format!("{MINIMAL}tokens = \"lots\"\n"), 6, 10, &["rate"]);
    assert_error(&format!("{MINIMAL}default_max_tokens = 100\n"), 6, 22, &["needs tokens"]);
    assert_error(&format!("{MINIMAL}token_accounting = \"usage\"\n"), 6, 20, &["needs tokens"]);
    assert_error(
        &format!("{MINIMAL}tokens = \"1000/min\"\ndefault_max_tokens = 0\n"),
        7,
        22,
        &["at least 1"],
    );
    assert_error(
        &format!("{MINIMAL}tokens = \"1000/min\"\ntoken_accounting = \"charged\"\n"),
        7,
        20,
        &["usage", "reserved"],
    );
}

#[test]
fn token_quota_names_are_reserved() {
    for name in ["tokens", "input_tokens", "output_tokens"] {
        let text = format!("{MINIMAL}\n[[upstream.limit]]\nname = \"{name}\"\nrate = \"1/s\"\n");
        assert_error(&text, 8, 8, &["name of a token quota"]);
    }
}
