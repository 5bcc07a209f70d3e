"""Write ``dialogsum_sample.jsonl``: 240 original, synthetic DialogSum-style records.

The real DialogSum corpus is CC BY-NC-SA, so it must not ship with the project. This script
composes its own dialogues from hand-written scenario templates instead, seeded so that the
output is byte-identical on every run. Run it from anywhere::

    python scripts/generate_sample.py [--out PATH] [--count N]

Template format: each scenario's ``turns`` alternate speakers, starting with ``#Person1#``. A
plain string is one turn; a tuple is an optional exchange of two turns (included at random, so
the dialogues vary in length while speakers keep alternating). ``{slot}`` placeholders are filled
from the scenario's ``slots`` (a pool per slot; a dict entry fills several slots at once, which
keeps related details such as a symptom and its advice consistent) and from the shared pools below.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

# The bundled sample that ships in the ``shared.samples`` package.
OUT_PATH = Path(__file__).resolve().parents[1] / "shared" / "samples" / "dialogsum_sample.jsonl"
COUNT = 240
MIN_TURNS, MAX_TURNS = 4, 12

NAMES = [
    "Alice", "Ben", "Carmen", "David", "Elena", "Frank", "Grace", "Hiro", "Ivy", "Jamal",
    "Katya", "Leo", "Maya", "Nikhil", "Olivia", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wei", "Yusuf", "Zoe",
]  # fmt: skip
SHARED: dict[str, list[Any]] = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "time": ["9 a.m.", "10:30 a.m.", "noon", "2 p.m.", "3:30 p.m.", "5 p.m.", "7 p.m."],
    "city": ["Lisbon", "Chicago", "Osaka", "Toronto", "Madrid", "Sydney", "Prague", "Denver"],
    "n": [str(k) for k in range(2, 7)],
    "price": [str(k) for k in range(15, 95, 5)],
    "big": [str(k) for k in range(600, 2400, 50)],
}


def _r(*rows: tuple[str, ...], keys: str) -> list[dict[str, str]]:
    """Turn rows of related values into slot bundles, e.g. ``_r(("a", "b"), keys="x y")``."""
    names = keys.split()
    return [dict(zip(names, row, strict=True)) for row in rows]


# A hand-laid data table: one turn per line reads better than the formatter's layout.
# fmt: off
SCENARIOS: list[dict[str, Any]] = [
    {
        "topic": "doctor visit",
        "slots": {"sym": _r(
            ("a sore throat", "three days", "gargle with warm salt water and avoid talking"),
            ("a bad headache", "a week", "drink more water and take a break from screens"),
            ("a cough that keeps me up", "two weeks", "use this syrup before bed"),
            ("pain in my lower back", "ten days", "do these stretches twice a day"),
            keys="sym dur advice")},
        "turns": [
            "Good morning, {b}. What seems to be the problem today?",
            "Hello, doctor. I've had {sym} for about {dur}.",
            ("Have you had a fever as well?", "No, no fever, just that."),
            "Let me take a look. It doesn't seem serious. I'd like you to {advice}.",
            "Should I take any time off work?",
            "A day or two of rest would help. Come back on {day} if it isn't better.",
            ("Do I need a prescription?", "Not for now. Over-the-counter medicine is enough."),
            "Thank you, doctor. I'll do that.",
        ],
        "summary": "#Person2# has had {sym} for {dur}. The doctor advises #Person2# to {advice} "
        "and to come back on {day} if it doesn't improve.",
    },
    {
        "topic": "job interview",
        "slots": {
            "job": ["sales assistant", "junior accountant", "web developer", "graphic designer",
                    "warehouse supervisor", "receptionist"],
            "co": ["Brightline", "Northwind", "Cedar & Co.", "Bluepeak", "Orbit Foods"],
            "yrs": ["two", "three", "four", "five"],
        },
        "turns": [
            "Thanks for coming in, {b}. Why do you want to work as a {job} at {co}?",
            "I've followed {co} for a while and I like how you treat your customers.",
            "What experience do you have?",
            "I worked as a {job} for {yrs} years at a smaller company.",
            ("What would you say is your main weakness?",
             "I sometimes take on too much, but I've learned to ask for help earlier."),
            "Can you start next month if we make you an offer?",
            "Yes, I can start right away.",
            "Great. We'll let you know by {day}.",
        ],
        "summary": "{b} is interviewed by #Person1# for a {job} position at {co} and mentions "
        "{yrs} years of experience. #Person1# will reply by {day}.",
    },
    {
        "topic": "shopping",
        "slots": {"item": _r(
            ("jacket", "black", "medium"), ("pair of jeans", "blue", "32"),
            ("sweater", "green", "large"), ("dress", "red", "small"), ("shirt", "white", "16"),
            keys="item color size")},
        "turns": [
            "Can I help you find something?",
            "Yes, I'm looking for a {color} {item} in size {size}.",
            "This one is our most popular. It's {price} dollars.",
            ("Is it on sale?", "Not this week, but it's good quality."),
            "Can I try it on?",
            "Of course. The fitting room is on your left.",
            "It fits well. I'll take it.",
            "Wonderful. You can pay at the counter.",
        ],
        "summary": "#Person2# is shopping for a {color} {item} in size {size}, tries one on "
        "and buys it for {price} dollars.",
    },
    {
        "topic": "flight booking",
        "slots": {"cls": ["economy", "business"], "way": ["round-trip", "one-way"]},
        "turns": [
            "Travel desk, how may I help you?",
            "I'd like to book a {way} flight to {city}, leaving on {day}.",
            "Economy or business class?",
            "{cls}, please.",
            "There's a flight at {time}. The fare is {big} dollars.",
            ("Does that include luggage?", "Yes, one checked bag is included."),
            "That's fine. Please book it for me.",
            "Done. I'll email you the ticket.",
        ],
        "summary": "#Person2# books a {way} {cls} flight to {city} leaving on {day} at {time} "
        "for {big} dollars.",
    },
    {
        "topic": "restaurant reservation",
        "slots": {"why": ["a birthday", "an anniversary", "a business dinner", "a farewell party"],
                  "time": ["6 p.m.", "7 p.m.", "7:30 p.m.", "8 p.m.", "8:30 p.m."]},
        "turns": [
            "Good evening, Olive Tree Restaurant.",
            "Hi, I'd like to reserve a table for {n} people on {day} at {time}.",
            "Let me check. Yes, we have a table. May I have your name?",
            "It's {b}. It's for {why}, so a quiet table would be nice.",
            ("Would you like us to prepare anything special?",
             "A small dessert with a candle would be lovely."),
            "No problem. We'll see you on {day}.",
        ],
        "summary": "{b} reserves a quiet table for {n} people at the restaurant on {day} at "
        "{time} for {why}.",
    },
    {
        "topic": "ordering food",
        "slots": {"dish": _r(
            ("the grilled salmon", "rice"), ("the mushroom risotto", "a side salad"),
            ("the chicken curry", "naan bread"), ("the vegetable lasagna", "garlic bread"),
            ("the beef stew", "mashed potatoes"), ("the tofu stir-fry", "steamed rice"),
            keys="dish side"),
            "drink": ["a glass of water", "a lemonade", "an iced tea", "a sparkling water"],
            "wait": ["ten", "fifteen", "twenty"]},
        "turns": [
            "Are you ready to order?",
            "Yes. I'll have {dish}, please.",
            "Would you like anything with that?",
            "{side}, please, and {drink}.",
            ("Any dessert tonight?", "Maybe later, thank you."),
            "Very good. It'll be about {wait} minutes.",
        ],
        "summary": "#Person2# orders {dish} with {side} and {drink}. The food will take about "
        "{wait} minutes.",
    },
    {
        "topic": "apartment rental",
        "slots": {"rooms": ["one-bedroom", "two-bedroom", "studio"],
                  "perk": ["a balcony", "a washing machine", "a parking space", "a garden"]},
        "turns": [
            "I'm calling about the {rooms} apartment you advertised.",
            "Yes, it's still available. The rent is {big} dollars a month.",
            "Are utilities included?",
            "Water is included, but electricity and internet are not.",
            ("Are pets allowed?", "Small pets are fine."),
            "Does it have {perk}?",
            "Yes, it does. Would you like to see it?",
            "Could I come on {day} at {time}?",
            "That works. See you then.",
        ],
        "summary": "#Person1# asks about a {rooms} apartment with {perk} renting for {big} "
        "dollars a month and arranges a viewing on {day} at {time}.",
    },
    {
        "topic": "parent-teacher meeting",
        "slots": {"subj": _r(
            ("math", "doesn't hand in homework", "check the homework planner every evening"),
            ("reading", "seems distracted in class", "read together for twenty minutes a day"),
            ("science", "is shy about asking questions", "encourage questions at home"),
            keys="subj issue plan")},
        "turns": [
            "Thanks for coming, {b}. I wanted to talk about your son's progress in {subj}.",
            "Is something wrong?",
            "He's bright, but he {issue}.",
            "I had no idea. What do you suggest?",
            "It would help if you could {plan}.",
            ("Is he getting along with the other children?", "Yes, he's very popular."),
            "All right. I'll start tonight.",
        ],
        "summary": "#Person1#, a teacher, tells {b} that {b}'s son is struggling in {subj} and "
        "{issue}. #Person1# suggests that {b} {plan}.",
    },
    {
        "topic": "homework",
        "slots": {"task": _r(
            ("history essay", "the industrial revolution"), ("biology report", "photosynthesis"),
            ("economics project", "inflation"), ("literature paper", "a Dickens novel"),
            keys="task about")},
        "turns": [
            "{b}, have you finished the {task} yet?",
            "Not yet. I'm stuck on the part about {about}.",
            "I found a good book on {about} in the library. Do you want to borrow it?",
            "Yes, please! When is it due again?",
            "On {day}. We could work on it together tomorrow.",
            ("Where should we meet?", "The library, after lunch."),
            "That would help a lot. Thanks.",
        ],
        "summary": "{b} is stuck on the {task} about {about}, which is due on {day}. #Person1# "
        "offers to lend {b} a book and to work on it together.",
    },
    {
        "topic": "bank account",
        "slots": {"acct": ["savings", "checking", "student"]},
        "turns": [
            "Good morning. I'd like to open a {acct} account.",
            "Certainly. Do you have a photo ID and proof of address?",
            "Yes, here's my passport and a utility bill.",
            "Thank you. There's a minimum deposit of {price} dollars.",
            ("Is there a monthly fee?", "No, not for this kind of account."),
            "That's fine. I'll deposit {big} dollars today.",
            "Your card will arrive by mail within a week.",
        ],
        "summary": "#Person1# opens a {acct} account with a passport and a utility bill and "
        "deposits {big} dollars. The card will arrive within a week.",
    },
    {
        "topic": "post office",
        "slots": {"what": ["a parcel", "some books", "a birthday present"],
                  "speed": ["express", "regular"]},
        "turns": [
            "I'd like to send {what} to {city}.",
            "Regular or express?",
            "How long does each take?",
            "Regular takes about ten days; express takes three.",
            ("Can I insure it?", "Yes, for a small extra fee."),
            "I'll send it {speed}, then.",
            "That comes to {price} dollars.",
        ],
        "summary": "#Person1# sends {what} to {city} by {speed} mail for {price} dollars.",
    },
    {
        "topic": "car repair",
        "slots": {"fault": _r(
            ("making a strange noise when I brake", "the brake pads are worn out"),
            ("failing to start in the morning", "the battery needs replacing"),
            ("pulling to the left", "the wheels need aligning"),
            keys="fault cause"),
            "cost": ["140", "180", "260", "320", "450"]},
        "turns": [
            "My car keeps {fault}. Could you take a look?",
            "Sure. Let me check it. Hmm, it looks like {cause}.",
            "How much will that cost?",
            "About {cost} dollars, parts and labor.",
            ("Is it safe to drive until then?", "I wouldn't risk it."),
            "When can it be ready?",
            "By {day} afternoon.",
        ],
        "summary": "#Person1#'s car keeps {fault}. The mechanic finds that {cause} and will fix "
        "it for about {cost} dollars by {day}.",
    },
    {
        "topic": "asking for directions",
        "slots": {"place": _r(
            ("the train station", "go straight for two blocks and turn right"),
            ("the city museum", "take the second left after the bridge"),
            ("the nearest pharmacy", "cross the square and look next to the bakery"),
            ("the post office", "follow this street as far as the fountain"),
            ("the central library", "turn left at the traffic lights and keep going"),
            ("the bus terminal", "walk down the hill and look on the right"),
            keys="place route"),
            "mins": ["five", "ten", "fifteen", "twenty"],
            "bus": ["a bus", "a taxi", "the tram"]},
        "turns": [
            "Excuse me, could you tell me how to get to {place}?",
            "Sure, {route}.",
            "Is it far?",
            "About {mins} minutes on foot.",
            ("Could I take {bus} instead?", "You could, but walking is just as quick."),
            "Thank you so much.",
        ],
        "summary": "#Person1# asks the way to {place}. #Person2# says to {route}; it's "
        "about {mins} minutes on foot.",
    },
    {
        "topic": "weekend plans",
        "slots": {"plan": _r(
            ("go hiking in the hills", "bring some sandwiches"),
            ("see the new science fiction film", "buy the tickets online"),
            ("visit the farmers' market", "bring some bags"),
            ("go to the beach", "bring an umbrella"),
            keys="plan bring")},
        "turns": [
            "{b}, do you have any plans for the weekend?",
            "Not really. Why?",
            "A few of us are going to {plan} on Saturday. Want to join?",
            "I'd love to. What time?",
            "We'll meet at {time} in front of my place.",
            ("Who else is coming?", "Just {c} and my cousin."),
            "Great. I'll {bring}.",
        ],
        "summary": "#Person1# invites {b} to {plan} on Saturday. {b} agrees to meet at {time} "
        "and will {bring}.",
    },
    {
        "topic": "birthday party",
        "slots": {"gift": ["a cookbook", "a scarf", "concert tickets", "a board game"],
                  "age": ["thirty", "forty", "twenty-one", "sixty"]},
        "turns": [
            "Are you coming to {c}'s birthday party on {day}?",
            "Of course! It's a big one, {c} turns {age}, right?",
            "Yes. I'm not sure what to get as a present.",
            "How about {gift}? We could share the cost.",
            ("Do you know if it's a surprise?", "It is, so don't say a word."),
            "Good idea. I'll buy it tomorrow and you can pay me back.",
        ],
        "summary": "#Person1# and #Person2# will go to {c}'s birthday party on {day}, where {c} "
        "turns {age}. They decide to share the cost of {gift} as a present.",
    },
    {
        "topic": "phone bill complaint",
        "slots": {"extra": ["international calls", "a premium streaming service",
                            "roaming data"]},
        "turns": [
            "Customer service, how can I help?",
            "My phone bill this month is {price} dollars higher than usual.",
            "Let me look at your account. I see charges for {extra}.",
            "But I never used {extra}.",
            ("Did anyone else use your phone?", "No, I live alone."),
            "I'm sorry. I'll remove the charge and send a corrected bill.",
            "Thank you. That's a relief.",
        ],
        "summary": "#Person2# complains about an extra {price} dollars for {extra} on the phone "
        "bill. #Person1# removes the charge and sends a corrected bill.",
    },
    {
        "topic": "gym membership",
        "slots": {"plan": _r(("monthly", "40"), ("yearly", "400"), ("student", "25"),
                             keys="plan fee"),
                  "cls": ["yoga", "spinning", "swimming", "boxing"]},
        "turns": [
            "Hi, I'm interested in joining the gym.",
            "Welcome! We have a {plan} plan for {fee} dollars.",
            "Does that include classes?",
            "Yes, including {cls} on {day} evenings.",
            ("Can I bring a friend?", "Once a month, for free."),
            "Sounds good. I'll sign up for the {plan} plan.",
        ],
        "summary": "#Person1# joins the gym on the {plan} plan for {fee} dollars, which includes "
        "{cls} classes on {day} evenings.",
    },
    {
        "topic": "hair salon",
        "slots": {"style": ["a short bob", "just a trim", "layers", "a fringe", "a buzz cut",
                            "soft curls"],
                  "color": ["no color", "some highlights", "a darker shade"],
                  "dur": ["half an hour", "an hour", "an hour and a half"]},
        "turns": [
            "What would you like today?",
            "I'd like {style}, please.",
            "Any color?",
            "{color}, I think.",
            ("How do you usually style it?", "I just let it dry naturally."),
            "All right. It will take about {dur}.",
            "That's fine.",
        ],
        "summary": "#Person2# asks for {style} with {color} at the hair salon, which will take "
        "about {dur}.",
    },
    {
        "topic": "pharmacy",
        "slots": {"med": _r(("antibiotics", "with food"), ("allergy tablets", "in the morning"),
                            ("eye drops", "before bed"), keys="med how")},
        "turns": [
            "Hello, I'm here to pick up a prescription under the name {a}.",
            "Let me find it. Here are your {med}.",
            "How should I take them?",
            "Use them {how}, and finish the whole course.",
            ("Any side effects?", "You might feel a little tired."),
            "Got it. How much do I owe you?",
            "{price} dollars, please.",
        ],
        "summary": "{a} picks up {med} at the pharmacy for {price} dollars and is told to use "
        "them {how}.",
    },
    {
        "topic": "lost luggage",
        "slots": {"bag": ["blue suitcase", "black backpack", "grey duffel bag", "red case"]},
        "turns": [
            "My bag didn't come out on the carousel. I flew in from {city}.",
            "I'm sorry. Can you describe it?",
            "It's a {bag} with a name tag.",
            "I've found it in our system. It's still in {city}.",
            "When will I get it back?",
            "It will arrive on the next flight. We'll deliver it to your hotel by tonight.",
            ("Can I buy some things I need?", "Keep the receipts and we'll refund you."),
        ],
        "summary": "#Person1#'s {bag} was left in {city}. The airline will deliver it to "
        "#Person1#'s hotel by tonight.",
    },
    {
        "topic": "movie tickets",
        "slots": {"film": ["the new animated film", "the spy thriller", "the documentary"],
                  "seat": ["in the middle", "near the aisle", "at the back"]},
        "turns": [
            "{n} tickets for {film}, please.",
            "For the {time} show?",
            "Yes. Are there seats {seat}?",
            "Yes, there are. That's {price} dollars.",
            ("Do you sell popcorn here?", "At the counter next door."),
            "Here you are. Thanks.",
        ],
        "summary": "#Person1# buys {n} tickets with seats {seat} for the {time} showing of "
        "{film}.",
    },
    {
        "topic": "asking for leave",
        "slots": {"why": ["a family wedding", "a family emergency", "moving house",
                          "a medical appointment"]},
        "turns": [
            "Do you have a minute? I'd like to ask for {n} days off next week.",
            "What's the occasion?",
            "It's because of {why}.",
            "Is your project on track?",
            "Yes. {c} agreed to cover for me while I'm away.",
            ("Will you be reachable?", "I'll check email once a day."),
            "Then that's fine. Enjoy your time off.",
        ],
        "summary": "#Person1# asks for {n} days off next week because of {why}. #Person2#, the "
        "boss, agrees since {c} will cover.",
    },
    {
        "topic": "scheduling a meeting",
        "slots": {"about": ["the budget", "the product launch", "the new website",
                            "the client visit"]},
        "turns": [
            "We need to meet about {about} this week.",
            "I'm free on {day}. How about {time}?",
            "{time} works for me. Should we invite {c}?",
            "Yes, {c} knows the numbers best.",
            ("Which room?", "The small meeting room on the third floor."),
            "I'll send out the invitation.",
        ],
        "summary": "#Person1# and #Person2# schedule a meeting about {about} on {day} at {time} "
        "and decide to invite {c}.",
    },
    {
        "topic": "returning an item",
        "slots": {"item": _r(("kettle", "it leaks"), ("lamp", "it flickers"),
                             ("pair of shoes", "they're too small"),
                             ("toaster", "it burns the bread"),
                             keys="item fault")},
        "turns": [
            "I'd like to return this {item} because {fault}.",
            "Do you have the receipt?",
            "Yes, here it is. I bought it on {day}.",
            "Would you like a refund or an exchange?",
            "A refund, please.",
            ("Would you like store credit instead?", "No, thanks, just the refund."),
            "Here's your {price} dollars back.",
        ],
        "summary": "#Person1# returns a {item} because {fault}, shows the receipt and gets a "
        "refund of {price} dollars.",
    },
    {
        "topic": "computer problem",
        "slots": {"issue": _r(
            ("my laptop won't connect to the Wi-Fi", "update the network driver"),
            ("my email keeps asking for a password", "reset the password"),
            ("the printer says it's offline", "restart the print service"),
            keys="issue fix")},
        "turns": [
            "IT help desk, this is {a}.",
            "Hi {a}, it's {b}. I have a problem: {issue}.",
            ("When did it start?", "This morning."),
            "Let me connect to your machine. I'll {fix}.",
            "Thanks, I'll wait.",
            "Done. Could you try again now?",
            "Yes, it works now. Thank you!",
        ],
        "summary": "{b} calls the IT help desk because {issue}. {a} connects remotely and "
        "solves it: {a} had to {fix}.",
    },
    {
        "topic": "vet visit",
        "slots": {"pet": _r(("dog", "hasn't been eating"), ("cat", "has been scratching her ear"),
                            ("rabbit", "has been very quiet"), keys="pet sym")},
        "turns": [
            "What brings you in today?",
            "My {pet} {sym}. I'm worried.",
            "How long has this been going on?",
            "Since {day}.",
            "Let me examine her. It's a minor infection. This medicine should help.",
            ("Is it contagious?", "Not to people."),
            "Thank you. I'll bring her back if it doesn't improve.",
        ],
        "summary": "#Person2#'s {pet} {sym} since {day}. The vet finds a minor infection and "
        "gives medicine.",
    },
    {
        "topic": "cooking",
        "slots": {"dish": _r(("pancakes", "flour, eggs and milk"),
                             ("tomato soup", "tomatoes, onions and garlic"),
                             ("fried rice", "rice, eggs and vegetables"),
                             ("lentil stew", "lentils, carrots and cumin"),
                             ("banana bread", "bananas, flour and butter"),
                             keys="dish ingr"),
                  "mins": ["twenty", "thirty", "forty-five"],
                  "secret": ["a pinch of salt at the end", "a little lemon juice",
                             "letting it rest for a few minutes"]},
        "turns": [
            "This {dish} is delicious! How did you make it?",
            "It's easy. You just need {ingr}.",
            "How long does it take?",
            "About {mins} minutes.",
            ("What's the secret?", "{secret}."),
            "Could you write down the recipe for me?",
            "Sure, I'll send it to you tonight.",
        ],
        "summary": "#Person1# praises #Person2#'s {dish}. #Person2# explains it takes {ingr} and "
        "about {mins} minutes, and will send the recipe.",
    },
    {
        "topic": "train tickets",
        "slots": {"seat": ["a window seat", "an aisle seat", "a quiet carriage"]},
        "turns": [
            "A ticket to {city} for {day}, please.",
            "Morning or afternoon?",
            "The earliest one after {time}.",
            "There's one twenty minutes later. Would you like {seat}?",
            "Yes, please.",
            ("Do you have a student card? There's a discount.", "No, I don't, unfortunately."),
            "That's {price} dollars.",
        ],
        "summary": "#Person1# buys a train ticket to {city} for {day} with {seat} for {price} "
        "dollars.",
    },
    {
        "topic": "hotel check-in",
        "slots": {"room": ["a double room", "a single room", "a suite"]},
        "turns": [
            "Good evening. I have a reservation under the name {a}.",
            "Welcome. Yes, {room} for {n} nights.",
            "What time is breakfast?",
            "From seven to ten in the restaurant.",
            ("Is there Wi-Fi?", "Yes, the password is on your key card."),
            "Could I have a late check-out on the last day?",
            "Until noon is fine.",
        ],
        "summary": "{a} checks in to {room} for {n} nights, asks about breakfast and gets a late "
        "check-out until noon.",
    },
    {
        "topic": "moving house",
        "slots": {"help": ["carry boxes", "pack the kitchen", "drive the van"]},
        "turns": [
            "{b}, I'm moving to a new flat on {day}. Could you help me?",
            "Sure. What do you need?",
            "Could you {help}?",
            "No problem. What time?",
            "Around {time}. I'll buy lunch for everyone.",
            ("Is it far?", "Just across town."),
            "Deal. See you on {day}.",
        ],
        "summary": "#Person1# is moving on {day} and asks {b} to {help}. {b} agrees to come at "
        "{time}.",
    },
    {
        "topic": "dentist",
        "slots": {"tooth": ["a filling", "a cleaning", "a check-up"]},
        "turns": [
            "Hello, I'd like to make an appointment for {tooth}.",
            "Are you a registered patient?",
            "Yes, my name is {a}.",
            "We have an opening on {day} at {time}.",
            ("Will it hurt?", "We'll make sure you're comfortable."),
            "Perfect. Please book it.",
        ],
        "summary": "{a} books a dental appointment for {tooth} on {day} at {time}.",
    },
    {
        "topic": "grocery shopping",
        "slots": {"food": ["fresh bread", "ripe avocados", "oat milk", "free-range eggs"]},
        "turns": [
            "Excuse me, where can I find {food}?",
            "Aisle {n}, next to the fruit.",
            "I looked there but there wasn't any left.",
            "Let me check the storeroom. Yes, we have some. I'll bring some out.",
            ("Are they on offer?", "Two for the price of one today."),
            "Thank you very much.",
        ],
        "summary": "#Person1# can't find {food} on the shelf, so #Person2# fetches some from the "
        "storeroom.",
    },
]
# fmt: on


def _fill(text: str, values: dict[str, str]) -> str:
    """Fill ``{slot}`` placeholders; capitalize the first letter so ``{slot}.`` openers read."""
    out = text.format(**values).replace(".m..", ".m.")  # "at 9 a.m.." -> "at 9 a.m."
    return out[:1].upper() + out[1:]


def compose(scenario: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """Compose one (dialogue, summary) pair from ``scenario``.

    Args:
        scenario: one entry of ``SCENARIOS``.
        rng: the source of every random choice, so the output depends only on its state.

    Returns:
        The dialogue (``#PersonN#:`` turns joined by newlines) and its summary.

    Raises:
        KeyError: a placeholder has no slot (a bug in the template).
        ValueError: the dialogue has fewer than MIN_TURNS or more than MAX_TURNS turns.
    """
    a, b, c = rng.sample(NAMES, 3)
    values: dict[str, str] = {"a": a, "b": b, "c": c}
    for key, pool in {**SHARED, **scenario["slots"]}.items():
        choice = rng.choice(pool)
        values.update(choice if isinstance(choice, dict) else {key: choice})
    turns: list[str] = []
    for item in scenario["turns"]:
        if isinstance(item, tuple):
            if rng.random() < 0.5:
                turns.extend(item)
        else:
            turns.append(item)
    lines = [f"#Person{i % 2 + 1}#: {_fill(t, values)}" for i, t in enumerate(turns)]
    if not MIN_TURNS <= len(lines) <= MAX_TURNS:
        raise ValueError(f"{scenario['topic']}: {len(lines)} turns")
    return "\n".join(lines), _fill(scenario["summary"], values)


def generate(count: int = COUNT, seed: int = 0) -> list[dict[str, str]]:
    """Build ``count`` unique records, spread evenly over the scenarios, in shuffled order.

    Args:
        count: number of records.
        seed: seed of the ``random.Random`` that makes every choice.

    Returns:
        Records with the keys ``id``, ``dialogue``, ``summary`` and ``topic``.

    Raises:
        RuntimeError: the templates can't yield ``count`` distinct dialogues.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    drafts: list[dict[str, str]] = []
    for i in range(count):
        scenario = SCENARIOS[i % len(SCENARIOS)]
        for _ in range(100):  # re-draw duplicates; the slot space is far larger than needed
            dialogue, summary = compose(scenario, rng)
            if dialogue not in seen:
                break
        else:
            raise RuntimeError(f"{scenario['topic']}: too few distinct dialogues")
        seen.add(dialogue)
        drafts.append({"dialogue": dialogue, "summary": summary, "topic": scenario["topic"]})
    rng.shuffle(drafts)
    return [{"id": f"sample_{i}", **d} for i, d in enumerate(drafts)]


def main(argv: list[str] | None = None) -> None:
    """Write the sample file (``--out``, default the bundled ``shared/samples`` one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args(argv)
    records = generate(args.count)
    with args.out.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
