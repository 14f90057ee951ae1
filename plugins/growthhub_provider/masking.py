"""Masking of personal data in log lines and summaries.

Free of Airflow imports so the sync library can mask what it logs and puts in XCom without
importing the hook.
"""

from __future__ import annotations

import re

_EMAIL_RE = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+([A-Za-z]{2,})")
_PHONE_RE = re.compile(r"\+?\d[\d\s().-]{5,}\d")


def _mask_phone(match: re.Match[str]) -> str:
    # "+" and 7+ digits, or 9+ digits: phone numbers, but not dates such as 2023-02-21.
    text = match.group()
    digits = re.sub(r"\D", "", text)
    is_phone = len(digits) >= 9 or (text.startswith("+") and len(digits) >= 7)
    return f"***{digits[-2:]}" if is_phone else text


def mask_pii(text: str) -> str:
    """Mask emails (``j***@***.com``) and phone numbers (``***67``) in a log line."""
    return _PHONE_RE.sub(_mask_phone, _EMAIL_RE.sub(r"\1***@***.\2", text))
