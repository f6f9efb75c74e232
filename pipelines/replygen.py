"""Deterministic generator of customer-support messages with an intent, a category, an entity and a reply.

The rows have the columns of the bitext support-replies file (`REPLY_COLUMNS`), so the demo and the tests of
the SFT recipe need nothing from `../shared`. All templates are written for this project; no third-party
row or text is copied. At most one entity per message; its offsets point into the message. Tags say how a
message was varied: B base, P polite (greeting or sign-off), L lower case, Z typos, I a question,
Q colloquial ("pls", "u"), K keyword style (a terse request).
"""

from __future__ import annotations

import numbers
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

REPLY_COLUMNS = (
    "instruction",
    "intent",
    "category",
    "entity_type",
    "entity_value",
    "start_offset",
    "end_offset",
    "tags",
    "response",
)

# intent -> (category, message templates, reply per entity type with "" for no entity).
# A template holds at most one slot, named after its entity type; a reply's "{value}" is the entity value.
_INTENTS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "cancel_order": (
        "ORDER",
        (
            "I want to cancel order {order_id}",
            "can you cancel my order {order_id} please",
            "Please stop order {order_id} before it ships.",
            "how do I cancel an order I placed yesterday?",
            "I changed my mind, cancel the purchase",
            "Is it too late to cancel order {order_id}?",
            "cancel order {order_id}",
        ),
        {
            "order_id": "I have asked the warehouse to stop order {value}. You will get a confirmation "
            "email once the cancellation is done, and any payment goes back to your original method.",
            "": "You can cancel an order from Orders in your account as long as it has not shipped. Tell me "
            "the order number and I will cancel it for you.",
        },
    ),
    "track_order": (
        "ORDER",
        (
            "where is my order {order_id}?",
            "Can you tell me when order {order_id} will arrive?",
            "I need the tracking link for my package",
            "has my order shipped yet?",
            "what's the status of order {order_id}",
            "track order {order_id}",
        ),
        {
            "order_id": "Order {value} is on its way. The tracking link is in your shipping email, and the "
            "carrier updates it every few hours.",
            "": "Every shipped order has a tracking link in its shipping email and under Orders in your "
            "account. Send me the order number if you cannot find it.",
        },
    ),
    "change_order": (
        "ORDER",
        (
            "I need to add an item to order {order_id}",
            "Can I change the size in order {order_id} before it ships?",
            "how do i edit an order i already placed",
            "please swap the color on my order {order_id}",
            "change my order, wrong quantity",
        ),
        {
            "order_id": "I can still change order {value} because it has not shipped. Tell me what to add, "
            "remove or swap and I will update it.",
            "": "Orders can be changed until they ship. Send me the order number and the change you need "
            "and I will take care of it.",
        },
    ),
    "get_refund": (
        "REFUND",
        (
            "I want my money back, {refund_amount} for a broken kettle",
            "Please refund {refund_amount} to my card",
            "how do I get a refund for a damaged item?",
            "Can I get refunded for something that never arrived?",
            "refund {refund_amount}",
            "I was promised a refund of {refund_amount}, can you send it?",
        ),
        {
            "refund_amount": "I have started a refund of {value} to your original payment method. It usually "
            "shows up within five business days.",
            "": "I am sorry about the trouble. I can refund the item to your original payment method; send "
            "me the order number and a photo if it arrived damaged.",
        },
    ),
    "refund_status": (
        "REFUND",
        (
            "I returned the boots two weeks ago, where is my refund?",
            "When will I see the {refund_amount} refund on my statement?",
            "my refund for order {order_id} hasn't arrived",
            "has my refund been processed yet",
            "status of refund {refund_amount}",
        ),
        {
            "refund_amount": "Your refund of {value} has been processed on our side. Banks take up to five "
            "business days to show it on your statement.",
            "order_id": "The refund for order {value} has been processed on our side. Banks take up to five "
            "business days to show it on your statement.",
            "": "Refunds are issued within two days of the return reaching us and take up to five business "
            "days to appear. Send me the order number and I will check yours.",
        },
    ),
    "reset_password": (
        "ACCOUNT",
        (
            "I forgot my password, my email is {account_email}",
            "can't log in, please reset the password for {account_email}",
            "how do I reset my password?",
            "The reset link never arrives in my inbox",
            "password reset {account_email}",
        ),
        {
            "account_email": "I have sent a password reset link to {value}. It works for one hour; check the "
            "spam folder if it does not arrive.",
            "": "Use Forgot password on the sign-in page and we will email you a reset link that works for "
            "one hour.",
        },
    ),
    "delete_account": (
        "ACCOUNT",
        (
            "Please delete my account {account_email}",
            "how can I close my account for good?",
            "I want all my data removed, account {account_email}",
            "delete my {account_type} account",
            "remove my profile please",
        ),
        {
            "account_email": "I have started closing the account {value}. You will get an email to confirm, "
            "and your data is erased thirty days later.",
            "account_type": "I have started closing your {value} account. You will get an email to confirm, "
            "and your data is erased thirty days later.",
            "": "You can close your account under Settings, Privacy. We email you to confirm and erase your "
            "data thirty days later.",
        },
    ),
    "upgrade_account": (
        "ACCOUNT",
        (
            "I'd like to upgrade to the {account_type} plan",
            "what does the {account_type} account include?",
            "how do I upgrade my account?",
            "switch me to {account_type} please",
            "is there a plan with more storage",
        ),
        {
            "account_type": "You can move to {value} under Settings, Plan. The new features start at once "
            "and you only pay the difference for this month.",
            "": "Our plans are compared under Settings, Plan. Pick the one you want and the change takes "
            "effect at once.",
        },
    ),
    "payment_failed": (
        "PAYMENT",
        (
            "my card keeps getting declined at checkout",
            "The payment failed but the money left my account",
            "why did my payment for order {order_id} not go through?",
            "payment error on order {order_id}",
            "Checkout says the transaction could not be processed",
        ),
        {
            "order_id": "I am sorry the payment for order {value} failed. Any amount held by your bank is "
            "released within three days; please try again or use another card.",
            "": "Payments usually fail when the card details or billing address do not match. Please check "
            "them or try another card; a held amount is released within three days.",
        },
    ),
    "get_invoice": (
        "PAYMENT",
        (
            "Can I get an invoice for order {order_id}?",
            "I need a copy of invoice {invoice_id}",
            "where do I download my invoices",
            "send me invoice {invoice_id} again please",
            "invoice for my last purchase",
        ),
        {
            "order_id": "I have emailed you the invoice for order {value}. You can also download every "
            "invoice under Orders in your account.",
            "invoice_id": "I have emailed you a copy of invoice {value}. You can also download every invoice "
            "under Orders in your account.",
            "": "Every invoice can be downloaded as a PDF under Orders in your account. Tell me the order "
            "number if you need it emailed.",
        },
    ),
    "change_address": (
        "SHIPPING",
        (
            "Please ship my order to {delivery_city} instead",
            "I moved, how do I change my delivery address?",
            "wrong address on order {order_id}",
            "can you update my address, I live in {delivery_city} now",
            "change shipping address",
        ),
        {
            "delivery_city": "I can send it to {value} instead. Please confirm the full street address and I "
            "will update the shipment.",
            "order_id": "I can still redirect order {value}. Please send me the full new address and I will "
            "update the shipment.",
            "": "You can change the delivery address under Settings, Addresses. Orders that have not shipped "
            "yet can be redirected; tell me the order number.",
        },
    ),
    "delivery_time": (
        "SHIPPING",
        (
            "How long does delivery to {delivery_city} take?",
            "do you ship to {delivery_city}?",
            "what are your delivery options",
            "how fast is express shipping?",
            "delivery time {delivery_city}",
        ),
        {
            "delivery_city": "We deliver to {value} in three to five business days, or in one to two with "
            "express shipping.",
            "": "Standard delivery takes three to five business days and express one to two. You can choose "
            "at checkout.",
        },
    ),
    "complaint": (
        "FEEDBACK",
        (
            "The courier was rude to me, I want to complain",
            "I am very unhappy with the service, my name is {person_name}",
            "this is the third time my order {order_id} is late!",
            "I want to file a complaint",
            "your support agent {person_name} never called me back",
        ),
        {
            "person_name": "I am sorry, {value}, and thank you for telling us. I have passed your complaint "
            "to the team lead, who will reply within two days.",
            "order_id": "I am sorry order {value} let you down. I have passed your complaint to the team "
            "lead, who will reply within two days.",
            "": "I am sorry for the experience. I have recorded your complaint and the team lead will reply "
            "within two days.",
        },
    ),
}

INTENTS: tuple[str, ...] = tuple(_INTENTS)

_FIRST = ("Maria", "John", "Aisha", "Chen", "Lucas", "Priya", "Tom", "Sofia", "Omar", "Hannah")
_LAST = ("Lopez", "Miller", "Khan", "Wang", "Novak", "Patel", "Brown", "Rossi", "Haddad", "Weber")
_DOMAINS = ("mail.com", "example.org", "inbox.net", "post.io")
_CITIES = ("Lisbon", "Denver", "Osaka", "Leeds", "Porto", "Austin", "Lyon", "Krakow", "Dublin", "Perth")
_ACCOUNT_TYPES = ("Premium", "Basic", "Family", "Business", "Student")

_ENTITY_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "order_id": lambda rng: str(rng.randint(10**7, 10**15 - 1)),
    "account_email": lambda rng: (
        f"{rng.choice(_FIRST).lower()}.{rng.choice(_LAST).lower()}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"
    ),
    "refund_amount": lambda rng: f"${rng.randint(5, 900)}.{rng.choice((0, 49, 95, 99)):02d}",
    "invoice_id": lambda rng: f"INV-{rng.randint(10000, 99999)}",
    "delivery_city": lambda rng: rng.choice(_CITIES),
    "account_type": lambda rng: rng.choice(_ACCOUNT_TYPES),
    "person_name": lambda rng: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
}

_GREETINGS = ("hi,", "Hello!", "hey there,", "Good morning.", "Hi team,")
_SIGN_OFFS = ("thanks", "Thank you!", "thx", "thanks in advance", "Cheers.")
_COLLOQUIAL = {"please": ("pls", "plz"), "you": ("u", "ya"), "want to": ("wanna",), "thanks": ("thx", "ty")}
_COLLOQUIAL_RE = re.compile(r"\b(?:please|you|want to|thanks)\b", re.IGNORECASE)
_SLOT_RE = re.compile(r"\{(\w+)\}")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_GREETING_P, _SIGN_OFF_P, _COLLOQUIAL_P, _LOWER_P, _TYPO_ROW_P, _TYPO_WORD_P = (
    0.3,
    0.25,
    0.35,
    0.3,
    0.25,
    0.15,
)
_WRITE_SUFFIXES = (".csv",)


def generate_replies(n: int, seed: int = 0, intents: list[str] | None = None) -> pd.DataFrame:
    """`n` support messages with replies, about as many per intent, in `REPLY_COLUMNS`; same seed, same rows.

    Rows without an entity have "" in entity_type/entity_value and <NA> offsets (nullable Int64).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}; pass n >= 1.")
    selected = _resolve_intents(intents)
    rng = random.Random(f"replygen:{seed}")
    labels = [selected[i % len(selected)] for i in range(int(n))]
    rng.shuffle(labels)
    frame = pd.DataFrame([_render_row(label, rng) for label in labels], columns=list(REPLY_COLUMNS))
    for column in ("start_offset", "end_offset"):
        frame[column] = frame[column].astype("Int64")
    return frame


def write_replies(
    path: str | os.PathLike[str], n: int, seed: int = 0, intents: list[str] | None = None
) -> Path:
    """Write `generate_replies(n, seed, intents)` to a CSV file (empty cells where there is no entity)."""
    out = Path(path)
    if out.suffix.lower() not in _WRITE_SUFFIXES:
        raise ValueError(f"write_replies writes CSV only, got {out.name!r}; use a path ending in .csv.")
    frame = generate_replies(n, seed=seed, intents=intents)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, encoding="utf-8", lineterminator="\n")
    return out


def _resolve_intents(intents: Sequence[str] | None) -> tuple[str, ...]:
    if intents is None:
        return INTENTS
    if isinstance(intents, str) or not list(intents):
        raise ValueError(
            f"intents must be a non-empty list of intent names, got {intents!r}; pass a list such as "
            f"['cancel_order'] or None for all of INTENTS."
        )
    unknown = sorted({str(name) for name in intents if name not in _INTENTS})
    if unknown:
        raise ValueError(f"intents contains unknown names {unknown}; choose from {', '.join(INTENTS)}.")
    chosen = set(intents)
    # Canonical order, so the caller's ordering or duplicates cannot change the rows.
    return tuple(name for name in INTENTS if name in chosen)


def _render_row(intent: str, rng: random.Random) -> dict[str, object]:
    category, templates, replies = _INTENTS[intent]
    template = rng.choice(templates)
    slots = _SLOT_RE.findall(template)
    entity_type = slots[0] if slots else ""
    entity_value = _ENTITY_FILLERS[entity_type](rng) if entity_type else ""
    before, _, after = template.partition("{" + entity_type + "}") if entity_type else (template, "", "")

    tags = ["B"]
    if len(template.split()) <= 4:
        tags.append("K")
    if rng.random() < _GREETING_P:
        before = f"{rng.choice(_GREETINGS)} {before}"
        tags.append("P")
    if rng.random() < _SIGN_OFF_P:
        after = (
            f"{after.rstrip()} {rng.choice(_SIGN_OFFS)}" if after.strip() else f" {rng.choice(_SIGN_OFFS)}"
        )
        tags.append("P")
    if rng.random() < _COLLOQUIAL_P:
        casual = [
            _COLLOQUIAL_RE.sub(lambda m: rng.choice(_COLLOQUIAL[m.group(0).lower()]), part)
            for part in (before, after)
        ]
        if casual != [before, after]:
            before, after = casual
            tags.append("Q")
    if rng.random() < _LOWER_P and (before + after) != (before + after).lower():
        before, after = before.lower(), after.lower()
        tags.append("L")
    if rng.random() < _TYPO_ROW_P:
        # Typos touch the words around the entity, never the entity itself, so the offsets stay exact.
        typed = [_WORD_RE.sub(lambda m: _typo(m.group(0), rng), part) for part in (before, after)]
        if typed != [before, after]:
            before, after = typed
            tags.append("Z")
    if (before + after).rstrip().endswith("?"):
        tags.append("I")

    instruction = before + entity_value + after
    start, end = (len(before), len(before) + len(entity_value)) if entity_type else (None, None)
    reply = replies[entity_type].replace("{value}", entity_value)
    return {
        "instruction": instruction,
        "intent": intent,
        "category": category,
        "entity_type": entity_type,
        "entity_value": entity_value,
        "start_offset": start,
        "end_offset": end,
        "tags": "".join(dict.fromkeys(tags)),
        "response": reply,
    }


def _typo(word: str, rng: random.Random) -> str:
    if rng.random() >= _TYPO_WORD_P:
        return word
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap two letters
    if kind == 1:
        return word[:i] + word[i + 1 :]  # drop one
    return word[:i] + word[i] + word[i:]  # double one
