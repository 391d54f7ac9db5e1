import logging

from multitag.logs import MASK, RedactingFilter, redact


def test_secret_env_values_are_masked(monkeypatch, caplog):
    monkeypatch.setenv("MY_SERVICE_API_TOKEN", "tok-1234567890")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcdEFGH12345678")
    monkeypatch.setenv("HOME_DIR_NAME", "not-a-secret-value")
    assert redact("auth tok-1234567890 / abcdEFGH12345678 at not-a-secret-value") == \
        f"auth {MASK} / {MASK} at not-a-secret-value"

    logger = logging.getLogger("test-redact")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO):
        logger.info("connecting with %s", "abcdEFGH12345678")
    assert caplog.records[-1].getMessage() == f"connecting with {MASK}"
    assert "abcdEFGH12345678" not in caplog.text
