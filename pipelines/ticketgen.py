"""Deterministic generator of synthetic customer-support tickets for intent classification.

All templates and vocabulary are written for this project; no third-party dataset is copied.
`vocabulary_shift`, `typo_rate`, `intents` and `label_weights` create covariate drift,
noise, unseen intents and label-mix shift on top of the same label semantics.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class IntentSpec:
    """One intent: its label and the message templates customers write for it."""

    name: str
    templates: tuple[str, ...]


# Sibling intents deliberately share vocabulary (refund/billing/return, cancel_order/subscription_cancel/
# change_order, delivery_delay/track_order/missing_item, reset_password/account_locked) so the task is
# learnable but a bag-of-words model cannot separate it perfectly.
_INTENT_SPECS: tuple[IntentSpec, ...] = (
    IntentSpec(
        "refund_request",
        (
            "I returned the {product} on {date} and still haven't received my refund. Can you check on it?",
            "Can I get a refund for order {order}? The {product} doesn't work the way it was described.",
            "refund please. order {order}",
            "I'd like the {amount} back for the {product}, it stopped working after {days} days.",
            "How long does a refund usually take? I sent the {product} back via {carrier} {days} days ago.",
            "I want a full refund for order {order}. I never even opened the box and I've changed my mind.",
            "Your site says refunds are processed within 5 business days but it has been {days} days "
            "and nothing has shown up on my {card}.",
            "I'd like to request a refund of {amount} for the {product} I bought on {date}. "
            "It's not what I expected and I'd rather not keep it.",
            "Is it possible to get refunded for the {product}? It arrived fine but it's way too small.",
            "The return for order {order} shows as received in your system. When will the refund of "
            "{amount} be issued?",
            "Can you refund me the difference? The {product} dropped to {amount} two days after I bought it.",
            "where is my refund?? you got the {product} back on {date}",
        ),
    ),
    IntentSpec(
        "billing_dispute",
        (
            "I was charged twice for order {order}. Please reverse the duplicate charge of {amount}.",
            "There's a charge of {amount} on my {card} statement from you that I don't recognize.",
            "Why was I billed {amount} on {date}? I didn't order anything.",
            "You charged me {amount} but the {product} was listed at a lower price at checkout. "
            "I want the difference refunded.",
            "unauthorized charge on my card ending in {last4}, {amount}. what is this",
            "I'm disputing the {amount} charge from {date}. I cancelled before the renewal date and was "
            "still billed.",
            "My bank statement shows two payments of {amount} for the same order. Only one should have gone "
            "through.",
            "I was charged for shipping even though order {order} was over the free shipping threshold.",
            "The amount taken from my card ({amount}) doesn't match my order total. Can someone explain the "
            "extra charge?",
            "If this isn't corrected I'll have to file a chargeback with my bank. Order {order}, charged "
            "{amount} twice.",
            "I think there's a billing error on my account. I see a charge for the {plan} plan but I'm "
            "on the free tier.",
            "wrong amount charged!! should be {amount}",
        ),
    ),
    IntentSpec(
        "return_request",
        (
            "How do I return the {product}? It doesn't fit.",
            "I'd like to return order {order}. Can you send me a return label?",
            "return label please, order {order}",
            "What's your return policy? I bought a {product} on {date} and I'm not happy with it.",
            "Can I return the {product} to a store or do I have to mail it back?",
            "I want to send back the {product}. It's still unopened. Do I get a refund or store credit?",
            "The return portal says order {order} isn't eligible for return. Why? It's only been "
            "{days} days.",
            "I printed the return label but {carrier} won't accept it. What should I do?",
            "Is it too late to return something I bought {days} days ago?",
            "I need to return {count} items from my last order. Do I need a separate label for each?",
            "Do I have to pay for return shipping on the {product}?",
        ),
    ),
    IntentSpec(
        "cancel_order",
        (
            "Please cancel order {order}. I ordered the wrong size.",
            "Can I still cancel my order? I placed it {time_ago} and it hasn't shipped yet.",
            "cancel order {order}",
            "I need to cancel the {product} I just ordered, I found it cheaper elsewhere.",
            "How do I cancel an order? There's no cancel button on the order page for {order}.",
            "I accidentally ordered the {product} twice. Please cancel one of them.",
            "I placed order {order} on {date} but I no longer need it. If it hasn't shipped, please "
            "cancel it and refund my {card}.",
            "Stop my order please! I didn't mean to buy the {product}.",
            "Is it too late to cancel order {order}? It still says processing.",
            "I want to cancel my purchase from {date}. The delivery estimate is {days} days which is way "
            "too long.",
            "don't ship the {product}, I don't want it anymore",
        ),
    ),
    IntentSpec(
        "change_order",
        (
            "Can I change the size on order {order} before it ships?",
            "I need to add another {product} to my order from {date}.",
            "change quantity on order {order} to {count}",
            "Is it possible to swap the {product} in my order for a different color?",
            "I'd like to remove the {product} from order {order} but keep the rest of the items.",
            "I ordered the wrong model. Can you update my order to the {product2} instead of cancelling it?",
            "How do I edit an order I already placed?",
            "Please upgrade the shipping on order {order} to express. I'll pay the difference.",
            "Can I modify my order? I forgot to include a gift message.",
            "I'd like to change the {product} in the order I placed {time_ago} to the bigger version.",
            "add a {product2} to order {order} please, same shipping",
        ),
    ),
    IntentSpec(
        "subscription_cancel",
        (
            "How do I cancel my subscription? I can't find the option anywhere in the app.",
            "Please cancel my {plan} subscription before the next billing date.",
            "cancel my membership",
            "I want to stop the auto-renewal on my {plan} plan. I don't want to be charged again on {date}.",
            "I've been trying to unsubscribe from the {plan} plan for a week. Every time I click cancel it "
            "sends me back to the home page.",
            "Please end my subscription effective immediately. I'm not using it anymore.",
            "Can I cancel the monthly plan and keep access until the end of the billing period?",
            "I signed up for the free trial and want to cancel before it converts into a paid subscription.",
            "Turn off recurring payments for my account {email}. I don't want to renew.",
            "Cancel my {plan} plan please. It's too expensive for what I use it for.",
            "stop charging me every month, I cancelled the {plan} plan on {date}",
        ),
    ),
    IntentSpec(
        "track_order",
        (
            "Where is my order {order}?",
            "Can you send me the tracking number for order {order}? I never got a shipping confirmation "
            "email.",
            "I ordered a {product} on {date}. How can I track it?",
            "The tracking link for my package doesn't work, it just says 'label created'. Which carrier is "
            "it with?",
            "Has order {order} shipped yet?",
            "What's the status of my order? It's been {days} days since I placed it.",
            "tracking number {tracking} shows nothing on the {carrier} site. Is this the right number?",
            "I'd like an update on where my {product} is. Order {order}.",
            "Can you tell me when order {order} will arrive? I need to plan to be home.",
            "I got an email saying my package is out for delivery but how do I see where it is right now?",
            "which carrier is shipping my {product}? order {order}",
        ),
    ),
    IntentSpec(
        "delivery_delay",
        (
            "My order {order} was supposed to arrive on {date} and it still hasn't come.",
            "The {carrier} tracking hasn't updated in {days} days. Is my package lost?",
            "Why is my delivery so late? I paid for express shipping and it's been over a week.",
            "still waiting on my {product}. estimated delivery was {date}. this is ridiculous",
            "The delivery date keeps getting pushed back. First it was {date}, now the tracking says another "
            "{days} days.",
            "My package has been stuck in transit at the {carrier} facility since {date}. Can you do "
            "something?",
            "I needed the {product} for a birthday on {date} and it's going to be late. Can you speed it up?",
            "Order {order} is {days} days late. When will it actually arrive?",
            "Your site promised delivery within 3-5 business days. It has now been {days} days and "
            "my order still shows as in transit.",
            "where is my package, it's been {days} days and {carrier} has no idea",
        ),
    ),
    IntentSpec(
        "change_address",
        (
            "I need to change the shipping address on order {order}. I'm moving this week.",
            "Can you update the delivery address to {street}, {city}? I typed the wrong one.",
            "wrong address on my order! it should be {street}",
            "Is it possible to redirect my package to my work address? The order hasn't shipped yet.",
            "I just realized my old address is still saved in my account. Please ship order {order} to "
            "{street}, {city} {zip} instead.",
            "How do I change the address for an order that's already been placed?",
            "Please update my default shipping address. I moved to {city}.",
            "The apartment number is missing from the address on order {order}. It should be {apt}.",
            "Can I have order {order} delivered to a different address? I won't be home on {date}.",
            "I made a typo in my zip code. It should be {zip}. Order {order}.",
            "send order {order} to {street} instead please",
        ),
    ),
    IntentSpec(
        "card_declined",
        (
            "My card keeps getting declined at checkout even though I have plenty of funds.",
            "Why was my {card} declined? I've used it on your site before.",
            "payment declined. tried {count} times. card ending {last4}",
            "I'm trying to buy the {product} but it says 'payment could not be processed'. My bank says "
            "there's no problem on their end.",
            "The checkout page keeps rejecting my {card}. Is something wrong with your payment system?",
            "My transaction failed but I still see a pending charge of {amount} on my card. Did the order "
            "go through?",
            "Card declined error every time I try to pay. I've double checked the CVV and expiry date.",
            "I can't complete my purchase, it says my card was declined. Is there another way to pay?",
            "Tried to renew my {plan} plan and the payment failed. The card is valid until next year.",
            "Your site declined my {card} ending in {last4} but it works everywhere else. What's going on?",
        ),
    ),
    IntentSpec(
        "update_payment_method",
        (
            "How do I update the card on file? My old {card} expired.",
            "I got a new card and need to change my payment method for the {plan} subscription.",
            "Please replace the card ending in {last4} with my new one.",
            "update payment method",
            "Can I switch from {card} to PayPal for future orders?",
            "I want to remove my old credit card from my account and add a different one. Where do I do "
            "that?",
            "My card was stolen so I cancelled it. How do I add the replacement card before my next billing "
            "date on {date}?",
            "Can you change the default payment method on my account to my {card}?",
            "The page to edit billing information keeps giving an error when I try to save my new card.",
            "I need to update the billing address attached to my card, it still has my old zip code.",
            "new {card}, same account. how do I put it on file",
        ),
    ),
    IntentSpec(
        "reset_password",
        (
            "I forgot my password and the reset email never arrives.",
            "How do I reset my password?",
            "The password reset link says it has expired. I clicked it within a minute.",
            "can't remember my password, please help",
            "I've requested a password reset {count} times but nothing shows up in my inbox or spam folder. "
            "My email is {email}.",
            "When I try to set a new password it says it doesn't meet the requirements but doesn't tell me "
            "what they are.",
            "Please send a password reset link to {email}.",
            "I changed my password on {date} and now the new one doesn't work either.",
            "reset password link not working",
            "I'm locked out because I can't remember my password. Can you help me set a new one?",
        ),
    ),
    IntentSpec(
        "account_locked",
        (
            "My account has been locked after too many login attempts. How do I unlock it?",
            "It says my account is suspended. I haven't done anything wrong.",
            "account locked. email is {email}",
            "I got a message saying my account was locked for security reasons. I need access to place an "
            "order today.",
            "I can't log in, it says 'account temporarily disabled'. Please unlock it.",
            "Why was my account frozen? I have order {order} in progress and can't see it.",
            "I entered the right password but it keeps saying my account is locked for 24 hours. That's too "
            "long.",
            "My account got blocked after I tried logging in from a new phone. Can you verify me and restore "
            "access?",
            "The verification code never arrives so I'm stuck and now the account is locked.",
            "Please reactivate my account, it was locked without any explanation.",
        ),
    ),
    IntentSpec(
        "close_account",
        (
            "Please delete my account and all my data.",
            "How do I close my account permanently?",
            "close my account",
            "I want to deactivate my account. I won't be shopping here anymore.",
            "Under GDPR I'm requesting that you delete my account and any personal information you hold on "
            "me. My email is {email}.",
            "I'd like to close my account after my last order {order} is delivered.",
            "Can you remove my account? I have a duplicate one under {email}.",
            "There's no option to delete my account in the settings. Please do it for me.",
            "Cancel my account entirely, not just the subscription.",
            "I'm done with this service. Shut down my account and stop sending me emails.",
        ),
    ),
    IntentSpec(
        "invoice_request",
        (
            "Can you send me an invoice for order {order}? I need it for my expense report.",
            "I need a VAT invoice with my company name on it for the {product}.",
            "invoice for order {order} please",
            "Where can I download receipts for my past orders?",
            "Could you email a copy of the invoice for my {plan} subscription payment on {date} to {email}?",
            "My accounting department needs an itemized receipt for the {amount} purchase.",
            "The invoice I received has the wrong billing address. Can you reissue it?",
            "I need invoices for all my orders from last quarter for tax purposes.",
            "Is it possible to get a receipt that shows the tax separately? Order {order}.",
            "I paid {amount} on {date} but never got a receipt by email.",
        ),
    ),
    IntentSpec(
        "damaged_item",
        (
            "The {product} arrived broken. The box was crushed.",
            "My order {order} came damaged. The {product} has a big crack down the side.",
            "item arrived damaged. want a replacement",
            "The {product} I received is scratched and one of the parts is bent. I have photos if you need "
            "them.",
            "Package was soaking wet when it arrived and the {product} inside is ruined.",
            "The {product} doesn't turn on. It looks like it was dropped during shipping, there's a dent on "
            "the corner.",
            "I received order {order} today and the glass was shattered. Can you send a new one or "
            "refund me?",
            "Half of the {product} was broken when I opened it. Very disappointed with the packaging.",
            "The seal on the {product} was torn and it's leaking everywhere.",
            "Received a damaged {product}. What do I need to do to get it replaced?",
        ),
    ),
    IntentSpec(
        "wrong_item",
        (
            "I ordered a {product} but received a {product2}.",
            "Wrong item in my package. Order {order} should have been a {product}.",
            "You sent me the wrong size. I ordered a medium and got an XL.",
            "This isn't what I ordered. The label says {product} but the box has something completely "
            "different.",
            "I received someone else's order. The packing slip has a different name on it.",
            "got the wrong color. ordered black, got pink",
            "The {product} I received is a different model than the one on the product page.",
            "Order {order} arrived today but it's the wrong item. How do I exchange it for the {product} "
            "I actually ordered?",
            "You shipped me a {product2} instead of the {product}. Can you send the correct one? I'll "
            "return this.",
            "The item I got doesn't match my order confirmation at all.",
        ),
    ),
    IntentSpec(
        "missing_item",
        (
            "My order {order} arrived but the {product} was missing from the box.",
            "I ordered {count} items but only one was in the package.",
            "The package was delivered but it was empty.",
            "missing item from order {order}",
            "The {product} came without the cable that's supposed to be included.",
            "Only part of my order showed up. Is the rest coming separately or was it forgotten?",
            "The packing slip lists the {product} but it wasn't in the box.",
            "I received order {order} today and one of the items is missing. I paid {amount} for it.",
            "Half my order is missing. Where's the {product}?",
            "The tracking says delivered but I only received one of my {count} packages.",
        ),
    ),
    IntentSpec(
        "promo_code_issue",
        (
            "The promo code {code} isn't working at checkout.",
            "I tried to use {code} but it says the code is invalid. It's from your newsletter.",
            "discount code not applying",
            "Your email said {percent} off with code {code} but the discount wasn't applied to my order "
            "{order}. Can you refund the difference?",
            "Why does it say my coupon has expired? The ad said it's valid until {date}.",
            "I forgot to apply my promo code {code} before placing the order. Can you still apply it?",
            "The code {code} only took off a few dollars instead of {percent}.",
            "Can I use two discount codes on one order? The second one gets rejected.",
            "I got a {percent} off coupon for my birthday but it says 'not eligible' on every item.",
            "Code {code} says it's already been used but this is my first order.",
        ),
    ),
)

# Vague messages that read naturally for every intent in their group. They are the irreducible error
# real support queues have: the label comes from what the customer meant, not from the words used.
_AMBIGUOUS_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("refund_request", "billing_dispute", "return_request"),
        (
            "I have a question about the {amount} from order {order}.",
            "Something is off with the payment for order {order}.",
            "About order {order} and the {amount}. Please look into it.",
        ),
    ),
    (
        ("cancel_order", "subscription_cancel", "change_order"),
        (
            "I want to cancel.",
            "How do I cancel? I don't need it anymore.",
            "Please stop it before I get charged.",
        ),
    ),
    (
        ("close_account", "subscription_cancel"),
        (
            "I don't want to use this anymore. Please take care of it.",
            "How do I get out of this? I'm done.",
        ),
    ),
    (
        ("track_order", "delivery_delay", "missing_item"),
        (
            "Any update on order {order}?",
            "Where is my stuff? Order {order}.",
            "Still don't have everything from order {order}.",
        ),
    ),
    (
        ("reset_password", "account_locked"),
        (
            "I can't log in.",
            "I can't get into my account, please help.",
            "Login isn't working for {email}.",
        ),
    ),
    (
        ("card_declined", "update_payment_method", "billing_dispute"),
        (
            "There's a problem with my card ending in {last4}.",
            "Something is wrong with my {card} on your site.",
        ),
    ),
    (
        ("damaged_item", "wrong_item", "missing_item"),
        (
            "There's a problem with the {product} I received.",
            "Order {order} arrived and it's not right.",
            "Not happy with what showed up from order {order}.",
        ),
    ),
    (
        ("invoice_request", "billing_dispute"),
        ("I have a question about the charge on my invoice for order {order}.",),
    ),
    (
        ("change_address", "change_order"),
        ("I need to change something on order {order} before it ships.",),
    ),
    (
        ("promo_code_issue", "billing_dispute", "refund_request"),
        ("I paid full price for order {order} and I don't think I should have.",),
    ),
)

INTENTS: tuple[str, ...] = tuple(spec.name for spec in _INTENT_SPECS)
_TEMPLATES: dict[str, tuple[str, ...]] = {spec.name: spec.templates for spec in _INTENT_SPECS}

_GREETINGS: tuple[str, ...] = (
    "Hi,",
    "Hello,",
    "Hi there,",
    "Hey,",
    "Good morning,",
    "Good afternoon,",
    "Dear support team,",
    "Hello team,",
    "To whom it may concern,",
    "Hi support,",
    "hello",
    "Hi {agent},",
)
_CLOSINGS: tuple[str, ...] = (
    "Thanks.",
    "Thank you!",
    "Thanks in advance.",
    "Thank you for your help.",
    "Regards, {name}",
    "Best, {name}",
    "Kind regards, {name}",
    "Cheers, {name}",
    "- {name}",
    "Appreciate it.",
    "Please advise.",
    "Looking forward to hearing from you.",
    "Any help is appreciated.",
    "{name}",
)
# Intent-agnostic sentences add realistic noise shared by every label.
_CONTEXT: tuple[str, ...] = (
    "I've been a customer for {years} years.",
    "This is the second time I'm contacting you about this.",
    "I already tried the live chat and got nowhere.",
    "My email on the account is {email}.",
    "I ordered it on {date}.",
    "Please get back to me as soon as possible.",
    "I'm really disappointed.",
    "Not happy about this at all.",
    "My phone number is on the account if you need to call.",
    "Order number is {order} if that helps.",
    "I'd appreciate a quick reply.",
    "This is really frustrating.",
    "I'm traveling next week so it's kind of urgent.",
    "I'm writing from my phone, sorry for any typos.",
)
_SUBJECTS: tuple[str, ...] = (
    "Re: order {order} -",
    "URGENT:",
    "Quick question:",
    "Help!",
    "Follow-up:",
    "Support request:",
)

_PRODUCTS: tuple[str, ...] = (
    "wireless earbuds",
    "phone case",
    "yoga mat",
    "coffee maker",
    "running shoes",
    "desk lamp",
    "backpack",
    "blender",
    "smartwatch",
    "bluetooth speaker",
    "hoodie",
    "water bottle",
    "laptop stand",
    "gaming mouse",
    "mechanical keyboard",
    "winter jacket",
    "throw blanket",
    "electric toothbrush",
    "hair dryer",
    "air purifier",
    "office chair",
    "cast iron skillet",
    "sneakers",
    "sunglasses",
    "baby monitor",
    "dog bed",
    "camping tent",
    "rice cooker",
    "webcam",
    "USB-C charger",
    "monitor",
    "tablet",
    "vacuum cleaner",
    "kettle",
)
# Product lines and carriers that only appear under vocabulary_shift, so drift brings unseen names.
_SHIFT_PRODUCTS: tuple[str, ...] = (
    "smart ring",
    "VR headset",
    "e-scooter",
    "air fryer",
    "drone",
    "robot mop",
    "espresso machine",
    "gimbal",
    "e-reader",
    "sous vide stick",
    "heated vest",
    "label printer",
)
_CARRIERS: tuple[str, ...] = ("UPS", "FedEx", "USPS", "DHL", "Royal Mail", "Canada Post", "OnTrac")
_SHIFT_CARRIERS: tuple[str, ...] = ("Evri", "GLS", "Purolator", "LaserShip", "Yodel")
_CARDS: tuple[str, ...] = (
    "Visa",
    "Mastercard",
    "Amex",
    "American Express card",
    "Discover card",
    "debit card",
)
_PLANS: tuple[str, ...] = ("Premium", "Plus", "Family", "Pro", "Basic", "annual", "monthly", "Student")
_CODES: tuple[str, ...] = (
    "SAVE20",
    "WELCOME10",
    "SPRING15",
    "FREESHIP",
    "VIP25",
    "THANKYOU5",
    "BDAY30",
    "FLASH40",
    "NEWYEAR",
    "SUMMER10",
)
_PERCENTS: tuple[str, ...] = ("10%", "15%", "20%", "25%", "30%", "40%", "50%")
_FIRST_NAMES: tuple[str, ...] = (
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Olivia",
    "Mateo",
    "Priya",
    "Liam",
    "Fatima",
    "Noah",
    "Sofia",
    "Kenji",
    "Emma",
    "Diego",
    "Hannah",
    "Tom",
    "Zoe",
    "Omar",
    "Grace",
    "Lukas",
)
_LAST_NAMES: tuple[str, ...] = (
    "Garcia",
    "Smith",
    "Khan",
    "Wang",
    "Brown",
    "Rossi",
    "Patel",
    "Murphy",
    "Nguyen",
    "Kowalski",
    "Silva",
    "Tanaka",
    "Johnson",
    "Okafor",
    "Meyer",
)
_AGENTS: tuple[str, ...] = ("Sam", "Alex", "Jordan", "Taylor", "Chris")
_EMAIL_DOMAINS: tuple[str, ...] = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me")
_MONTHS: tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_STREETS: tuple[str, ...] = ("Oak", "Maple", "Main", "Cedar", "Pine", "Elm", "Lake", "Hill", "Park", "River")
_STREET_TYPES: tuple[str, ...] = ("Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Blvd")
_CITIES: tuple[str, ...] = (
    "Portland",
    "Austin",
    "Denver",
    "Toronto",
    "Leeds",
    "Chicago",
    "Boston",
    "Seattle",
    "Phoenix",
    "Atlanta",
    "Manchester",
    "Vancouver",
)
_APT_PREFIXES: tuple[str, ...] = ("Apt", "Unit", "Suite", "#")
_TIMES_AGO: tuple[str, ...] = (
    "an hour ago",
    "this morning",
    "last night",
    "20 minutes ago",
    "yesterday",
    "a few minutes ago",
)

# Register rewrites for vocabulary_shift: same meaning, different surface form (slang, abbreviations).
_SHIFT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("package", ("pkg", "parcel")),
    ("packages", ("pkgs", "parcels")),
    ("account", ("acct", "acc")),
    ("please", ("pls", "plz")),
    ("thanks", ("thx", "ty", "tysm")),
    ("thank you", ("ty", "thx", "thank u")),
    ("a refund", ("my money back", "a reimbursement")),
    ("refund", ("money back", "reimbursement")),
    ("refunded", ("reimbursed", "paid back")),
    ("password", ("pw", "pwd", "passcode")),
    ("subscription", ("sub", "subscr")),
    ("cancel", ("cxl",)),
    ("because", ("bc", "cuz")),
    ("you", ("u",)),
    ("your", ("ur",)),
    ("you're", ("ur", "youre")),
    ("right now", ("rn",)),
    ("as soon as possible", ("asap", "ASAP")),
    ("tomorrow", ("tmrw", "tmr")),
    ("address", ("addy", "addr")),
    ("message", ("msg",)),
    ("credit card", ("cc",)),
    ("tracking number", ("tracking #", "trk no")),
    ("order number", ("order #", "ord no")),
    ("charged", ("dinged", "hit")),
    ("broken", ("busted", "wrecked")),
    ("damaged", ("messed up", "trashed", "beat up")),
    ("what's going on", ("wth", "what gives")),
    ("really", ("rly", "super")),
    ("with", ("w/",)),
    ("without", ("w/o",)),
    ("invoice", ("inv", "bill")),
    ("promo code", ("promo", "voucher")),
    ("discount code", ("voucher", "promo")),
    ("minutes", ("mins",)),
    ("number", ("num", "no.")),
    ("phone", ("cell", "mobile")),
    ("information", ("info",)),
    ("hello", ("yo", "heya")),
    ("hi", ("yo", "heya", "hiya")),
    ("hey", ("yo", "heyyy")),
    ("about", ("abt",)),
    ("today", ("2day", "tday")),
    ("ridiculous", ("ridic", "absurd")),
    ("disappointed", ("bummed", "gutted")),
    ("immediately", ("asap", "stat")),
    ("delivered", ("dropped off",)),
    ("delivery", ("drop-off", "deliv")),
    ("received", ("rcvd", "recvd")),
    ("items", ("things", "stuff")),
    ("item", ("thing", "itm")),
    ("email", ("e-mail", "mail")),
    ("problem", ("prob",)),
    ("checkout", ("the pay page",)),
    ("something", ("smth", "sth")),
    ("people", ("ppl",)),
    ("don't", ("dont", "do not")),
)
_SHIFT_TABLE: dict[str, tuple[str, ...]] = dict(_SHIFT_RULES)

# QWERTY neighbours for realistic fat-finger typos.
_NEIGHBOURS: dict[str, str] = {
    "q": "wa",
    "w": "qeas",
    "e": "wrds",
    "r": "etdf",
    "t": "ryfg",
    "y": "tugh",
    "u": "yihj",
    "i": "uojk",
    "o": "ipkl",
    "p": "ol",
    "a": "qwsz",
    "s": "awedxz",
    "d": "serfcx",
    "f": "drtgvc",
    "g": "ftyhbv",
    "h": "gyujnb",
    "j": "huikmn",
    "k": "jiolm",
    "l": "kop",
    "z": "asx",
    "x": "zsdc",
    "c": "xdfv",
    "v": "cfgb",
    "b": "vghn",
    "n": "bhjm",
    "m": "njk",
}

_OTHER_PRODUCT_SLOT: dict[str, str] = {"product": "product2", "product2": "product"}
_SHIFT_POOLS: dict[str, tuple[str, ...]] = {
    "product": _SHIFT_PRODUCTS,
    "product2": _SHIFT_PRODUCTS,
    "carrier": _SHIFT_CARRIERS,
}

_SLOT_RE = re.compile(r"\{(\w+)\}")
_WORD_RE = re.compile(r"[A-Za-z]+")
# Products are slotted after "a"; "an" before vowels (u excluded: "a USB-C charger").
_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeioAEIO])")
_WRITE_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".parquet")

_AMBIGUOUS_P = 0.08
_GREETING_P = 0.45
_CLOSING_P = 0.4
_CONTEXT_P = 0.25
_SUBJECT_P = 0.06
_LOWER_P = 0.2
_SHOUT_WORD_P = 0.08
_SHOUT_ALL_P = 0.015
_MIN_ROWS_PER_INTENT = 3


def generate_tickets(
    n_rows: int = 2000,
    *,
    seed: int = 0,
    intents: Sequence[str] | None = None,
    label_weights: Mapping[str, float] | None = None,
    typo_rate: float = 0.03,
    vocabulary_shift: float = 0.0,
) -> pd.DataFrame:
    """Generate `n_rows` synthetic support tickets as a DataFrame with columns ["text", "label"].

    Intents with weight 0 get no rows; every other selected intent gets at least
    min(3, n_rows // number_of_intents) rows. Labels and base texts depend only on
    `seed`, `n_rows`, `intents` and `label_weights`, so changing `typo_rate` or
    `vocabulary_shift` perturbs the same tickets.
    """
    _check_n_rows(n_rows)
    _check_probability("typo_rate", typo_rate)
    _check_probability("vocabulary_shift", vocabulary_shift)
    selected = _resolve_intents(intents)
    weights = _resolve_weights(selected, label_weights)
    n_rows, typo_rate, vocabulary_shift = int(n_rows), float(typo_rate), float(vocabulary_shift)

    # Separate streams keep labels and base texts identical when only typo_rate/vocabulary_shift change.
    base_rng = random.Random(f"ticketgen:{seed}:base")
    shift_rng = random.Random(f"ticketgen:{seed}:shift")
    typo_rng = random.Random(f"ticketgen:{seed}:typo")

    labels = _draw_labels(n_rows, selected, weights, base_rng)
    texts = [
        _render_ticket(label, base_rng, shift_rng, vocabulary_shift, typo_rng, typo_rate) for label in labels
    ]
    return pd.DataFrame({"text": texts, "label": labels}, columns=["text", "label"])


def write_tickets(path: str | os.PathLike[str], n_rows: int = 2000, **kwargs: Any) -> Path:
    """Write `generate_tickets(n_rows, **kwargs)` to .csv, .jsonl or .parquet (by suffix); return the path."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in _WRITE_SUFFIXES:
        shown = f"'{out.suffix}'" if out.suffix else "no suffix"
        raise ValueError(
            f"write_tickets cannot write {out.name!r} with {shown}; use a path ending in "
            f"{', '.join(_WRITE_SUFFIXES)}."
        )
    frame = generate_tickets(n_rows, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(out, index=False, encoding="utf-8", lineterminator="\n")
    elif suffix == ".jsonl":
        with out.open("w", encoding="utf-8", newline="\n") as handle:
            for text, label in zip(frame["text"], frame["label"], strict=True):
                handle.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    else:
        frame.to_parquet(out, index=False)
    return out


def _check_n_rows(n_rows: int) -> None:
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive integer, got {n_rows!r}; pass n_rows >= 1.")


def _check_probability(name: str, value: float) -> None:
    # `not (0 <= v <= 1)` also rejects NaN.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}; pass a value in [0, 1].")


def _unknown_message(argument: str, unknown: Sequence[str]) -> str:
    return (
        f"{argument} contains unknown intent names {sorted(unknown)}; "
        f"choose from champion's INTENTS: {', '.join(INTENTS)}."
    )


def _resolve_intents(intents: Sequence[str] | None) -> tuple[str, ...]:
    if intents is None:
        return INTENTS
    if isinstance(intents, str):
        raise ValueError(
            f"intents must be a sequence of intent names, not the single string {intents!r}; "
            f"wrap it in a list such as [{intents!r}]."
        )
    names = list(intents)
    if not names:
        raise ValueError("intents is empty; name at least one intent or pass None to use all of INTENTS.")
    unknown = sorted({str(name) for name in names if name not in _TEMPLATES})
    if unknown:
        raise ValueError(_unknown_message("intents", unknown))
    # Canonical INTENTS order, so the caller's ordering or duplicates cannot change the output.
    chosen = set(names)
    return tuple(name for name in INTENTS if name in chosen)


def _resolve_weights(selected: tuple[str, ...], label_weights: Mapping[str, float] | None) -> list[float]:
    if label_weights is None:
        return [1.0] * len(selected)
    unknown = sorted(str(name) for name in label_weights if name not in _TEMPLATES)
    if unknown:
        raise ValueError(_unknown_message("label_weights", unknown))
    outside = sorted(name for name in label_weights if name not in selected)
    if outside:
        raise ValueError(
            f"label_weights names intents {outside} that are not in intents; "
            f"add them to intents or drop them from label_weights."
        )
    bad: dict[str, Any] = {}
    for name, weight in label_weights.items():
        is_number = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight) or weight < 0:
            bad[name] = weight
    if bad:
        raise ValueError(
            f"label_weights must be finite non-negative numbers, got {bad}; "
            f"use 0 to exclude an intent and positive values otherwise."
        )
    weights = [float(label_weights.get(name, 1.0)) for name in selected]
    if not any(weight > 0 for weight in weights):
        raise ValueError(
            "label_weights gives every selected intent weight 0; give at least one intent a positive weight."
        )
    return weights


def _draw_labels(
    n_rows: int, selected: tuple[str, ...], weights: list[float], rng: random.Random
) -> list[str]:
    """Exact weighted counts with a per-intent floor (largest remainder), shuffled."""
    active = [(name, weight) for name, weight in zip(selected, weights, strict=True) if weight > 0]
    floor = min(_MIN_ROWS_PER_INTENT, n_rows // len(active))
    remaining = n_rows - floor * len(active)
    total = sum(weight for _, weight in active)
    quotas = [remaining * weight / total for _, weight in active]
    counts = [floor + int(quota) for quota in quotas]
    leftover = n_rows - sum(counts)
    # Random tie-breaks so equal remainders (e.g. n_rows < number of intents) do not favour early intents.
    order = sorted(range(len(active)), key=lambda i: (-(quotas[i] - int(quotas[i])), rng.random()))
    for i in order[:leftover]:
        counts[i] += 1
    labels = [name for (name, _), count in zip(active, counts, strict=True) for _ in range(count)]
    rng.shuffle(labels)
    return labels


def _render_ticket(
    label: str,
    rng: random.Random,
    shift_rng: random.Random,
    shift: float,
    typo_rng: random.Random,
    typo_rate: float,
) -> str:
    values: dict[str, str] = {}

    def fill(template: str) -> str:
        return _SLOT_RE.sub(lambda m: _slot_value(m.group(1), values, rng, shift_rng, shift), template)

    templates = _ambiguous_templates(label) if rng.random() < _AMBIGUOUS_P else _TEMPLATES[label]
    body = fill(templates[rng.randrange(len(templates))])
    # Draw every style decision from the base stream up front so its consumption never depends on
    # the shifted or typo'd text (keeps runs with different drift settings aligned row by row).
    parts: list[str] = []
    if rng.random() < _SUBJECT_P:
        parts.append(fill(rng.choice(_SUBJECTS)))
    if rng.random() < _GREETING_P:
        parts.append(fill(rng.choice(_GREETINGS)))
    parts.append(body)
    if rng.random() < _CONTEXT_P:
        parts.append(fill(rng.choice(_CONTEXT)))
    if rng.random() < _CLOSING_P:
        parts.append(fill(rng.choice(_CLOSINGS)))
    casing, shout_pos = rng.random(), rng.random()
    drop_final, multiply, no_apostrophes, no_commas = (rng.random() for _ in range(4))
    marks = rng.choice(("??", "???", "?!", "!!", "!!!"))

    text = " ".join(parts)
    if shift > 0:
        text = _shift_pattern().sub(lambda m: _rewrite(m, shift_rng, shift), text)
    text = _ARTICLE_RE.sub(r"\1n ", text)
    text = _apply_casing(text, casing, shout_pos)
    text = _apply_punctuation(text, drop_final, multiply, no_apostrophes, no_commas, marks)
    if typo_rate > 0:
        text = _WORD_RE.sub(lambda m: _maybe_typo(m.group(0), typo_rng, typo_rate), text)
    return text


@cache
def _ambiguous_templates(label: str) -> tuple[str, ...]:
    shared = [t for group, templates in _AMBIGUOUS_GROUPS if label in group for t in templates]
    return tuple(shared) or _TEMPLATES[label]


def _slot_value(
    slot: str, values: dict[str, str], rng: random.Random, shift_rng: random.Random, shift: float
) -> str:
    # One value per slot per ticket, so a template mentioning {order} twice stays consistent.
    if slot in values:
        return values[slot]
    value = _SLOT_FILLERS[slot](rng)
    other = _OTHER_PRODUCT_SLOT.get(slot)
    if other is not None:
        # Compare unshifted values so the base stream's draws do not depend on vocabulary_shift.
        while value == values.get(f"base:{other}"):
            value = rng.choice(_PRODUCTS)
        values[f"base:{slot}"] = value
    if slot in _SHIFT_POOLS and shift > 0 and shift_rng.random() < shift:
        value = shift_rng.choice(_SHIFT_POOLS[slot])
        while other is not None and value == values.get(other):
            value = shift_rng.choice(_SHIFT_POOLS[slot])
    values[slot] = value
    return value


def _order(rng: random.Random) -> str:
    number = rng.randint(10000, 99999)
    return f"#{number}" if rng.random() < 0.85 else str(number)


def _amount(rng: random.Random) -> str:
    cents = rng.choice((99, 99, 95, 49, 0, rng.randint(0, 99)))
    return f"${rng.randint(4, 480)}.{cents:02d}"


def _date(rng: random.Random) -> str:
    style = rng.randrange(4)
    day = rng.randint(1, 28)
    if style == 0:
        return f"{rng.choice(_MONTHS)} {day}"
    if style == 1:
        return f"{rng.randint(1, 12)}/{day}"
    if style == 2:
        suffix = "th" if 10 < day < 14 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
        return f"the {day}{suffix}"
    return rng.choice(_WEEKDAYS)


def _email(rng: random.Random) -> str:
    first, last = rng.choice(_FIRST_NAMES).lower(), rng.choice(_LAST_NAMES).lower()
    local = rng.choice((f"{first}.{last}", f"{first}{last[0]}", f"{first[0]}{last}{rng.randint(1, 99)}"))
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _street(rng: random.Random) -> str:
    return f"{rng.randint(1, 2999)} {rng.choice(_STREETS)} {rng.choice(_STREET_TYPES)}"


def _tracking(rng: random.Random) -> str:
    prefix = rng.choice(("1Z", "94", "TBA", ""))
    return prefix + "".join(str(rng.randrange(10)) for _ in range(12))


_SLOT_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "product": lambda rng: rng.choice(_PRODUCTS),
    "product2": lambda rng: rng.choice(_PRODUCTS),
    "order": _order,
    "amount": _amount,
    "date": _date,
    "carrier": lambda rng: rng.choice(_CARRIERS),
    "card": lambda rng: rng.choice(_CARDS),
    "last4": lambda rng: f"{rng.randrange(10000):04d}",
    "name": lambda rng: rng.choice(_FIRST_NAMES),
    "agent": lambda rng: rng.choice(_AGENTS),
    "email": _email,
    "plan": lambda rng: rng.choice(_PLANS),
    "days": lambda rng: str(rng.randint(2, 21)),
    "years": lambda rng: str(rng.randint(2, 12)),
    "count": lambda rng: str(rng.randint(2, 5)),
    "code": lambda rng: rng.choice(_CODES),
    "percent": lambda rng: rng.choice(_PERCENTS),
    "street": _street,
    "city": lambda rng: rng.choice(_CITIES),
    "zip": lambda rng: f"{rng.randrange(100000):05d}",
    "apt": lambda rng: f"{rng.choice(_APT_PREFIXES)} {rng.randint(1, 40)}{rng.choice('ABCD')}",
    "tracking": _tracking,
    "time_ago": lambda rng: rng.choice(_TIMES_AGO),
}


@cache
def _shift_pattern() -> re.Pattern[str]:
    # Longest phrases first so "thank you" wins over "you" and "order number" over "number".
    phrases = sorted(_SHIFT_TABLE, key=lambda phrase: (-len(phrase), phrase))
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)


def _rewrite(match: re.Match[str], rng: random.Random, shift: float) -> str:
    found = match.group(0)
    if rng.random() >= shift:
        return found
    replacement = rng.choice(_SHIFT_TABLE[found.lower()])
    if len(found) > 1 and found.isupper():
        return replacement.upper()
    if found[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def _apply_casing(text: str, casing: float, shout_pos: float) -> str:
    if casing < _LOWER_P:
        return text.lower()
    if casing < _LOWER_P + _SHOUT_ALL_P:
        return text.upper()
    if casing < _LOWER_P + _SHOUT_ALL_P + _SHOUT_WORD_P:
        words = text.split(" ")
        candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
        if candidates:
            i = candidates[int(shout_pos * len(candidates))]
            words[i] = words[i].upper()
            return " ".join(words)
    return text


def _apply_punctuation(
    text: str, drop_final: float, multiply: float, no_apostrophes: float, no_commas: float, marks: str
) -> str:
    if no_apostrophes < 0.12:
        text = text.replace("'", "")
    if no_commas < 0.05:
        text = text.replace(",", "")
    if multiply < 0.1:
        text = text.replace("?", marks) if "?" in text else text.replace("!", marks)
    if drop_final < 0.15 and text.endswith("."):
        text = text[:-1]
    return text


def _maybe_typo(word: str, rng: random.Random, rate: float) -> str:
    if len(word) < 2 or rng.random() >= rate:
        return word
    kind = rng.random()
    i = rng.randrange(len(word))
    if kind < 0.3:
        swappable = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
        if swappable:
            j = swappable[i % len(swappable)]
            return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    elif kind < 0.55 and len(word) >= 3:
        return word[:i] + word[i + 1 :]
    elif kind < 0.8:
        neighbours = _NEIGHBOURS.get(word[i].lower())
        if neighbours:
            key = rng.choice(neighbours)
            return word[:i] + (key.upper() if word[i].isupper() else key) + word[i + 1 :]
    return word[:i] + word[i] + word[i:]
