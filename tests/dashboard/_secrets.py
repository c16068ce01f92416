"""What the dashboard's tests share besides fixtures: the token, and a hostile payload."""

#: The dashboard's token in these tests.
TOKEN = "s3cret-token-for-tests"  # noqa: S105 - a test token

#: A payload that would run if the page did not escape it.
XSS = '<script>window.__pwned = true; alert("pwned")</script><img src=x onerror="window.__pwned=1">'
