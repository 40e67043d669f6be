#!/usr/bin/env python3
"""Writes the question-answering demo's data/qa/train.tsv and dev.tsv (question<TAB>answer):
questions about the world's countries (capital, continent) from the table below, written for
this project (facts, no third-party text; CC0). The dev split holds every question about 25
countries chosen with random.Random(5), so no dev country appears in training: what the
fine-tuned model must bring to them is its own knowledge, in the short answer form it learns.

    python3 scripts/make_qa.py
"""
import random
from pathlib import Path

# country, capital, continent
TABLE = """Afghanistan|Kabul|Asia
Albania|Tirana|Europe
Algeria|Algiers|Africa
Argentina|Buenos Aires|South America
Armenia|Yerevan|Asia
Australia|Canberra|Oceania
Austria|Vienna|Europe
Bangladesh|Dhaka|Asia
Belgium|Brussels|Europe
Bolivia|Sucre|South America
Brazil|Brasília|South America
Bulgaria|Sofia|Europe
Cambodia|Phnom Penh|Asia
Cameroon|Yaoundé|Africa
Canada|Ottawa|North America
Chile|Santiago|South America
China|Beijing|Asia
Colombia|Bogotá|South America
Croatia|Zagreb|Europe
Cuba|Havana|North America
Czechia|Prague|Europe
Denmark|Copenhagen|Europe
Ecuador|Quito|South America
Egypt|Cairo|Africa
Estonia|Tallinn|Europe
Ethiopia|Addis Ababa|Africa
Finland|Helsinki|Europe
France|Paris|Europe
Germany|Berlin|Europe
Ghana|Accra|Africa
Greece|Athens|Europe
Hungary|Budapest|Europe
Iceland|Reykjavík|Europe
India|New Delhi|Asia
Indonesia|Jakarta|Asia
Iran|Tehran|Asia
Iraq|Baghdad|Asia
Ireland|Dublin|Europe
Israel|Jerusalem|Asia
Italy|Rome|Europe
Jamaica|Kingston|North America
Japan|Tokyo|Asia
Jordan|Amman|Asia
Kenya|Nairobi|Africa
Latvia|Riga|Europe
Lebanon|Beirut|Asia
Lithuania|Vilnius|Europe
Madagascar|Antananarivo|Africa
Malaysia|Kuala Lumpur|Asia
Mali|Bamako|Africa
Mexico|Mexico City|North America
Mongolia|Ulaanbaatar|Asia
Morocco|Rabat|Africa
Nepal|Kathmandu|Asia
Netherlands|Amsterdam|Europe
New Zealand|Wellington|Oceania
Nigeria|Abuja|Africa
North Korea|Pyongyang|Asia
Norway|Oslo|Europe
Pakistan|Islamabad|Asia
Panama|Panama City|North America
Paraguay|Asunción|South America
Peru|Lima|South America
Philippines|Manila|Asia
Poland|Warsaw|Europe
Portugal|Lisbon|Europe
Qatar|Doha|Asia
Romania|Bucharest|Europe
Russia|Moscow|Europe
Saudi Arabia|Riyadh|Asia
Senegal|Dakar|Africa
Serbia|Belgrade|Europe
Singapore|Singapore|Asia
Slovakia|Bratislava|Europe
Slovenia|Ljubljana|Europe
South Africa|Pretoria|Africa
South Korea|Seoul|Asia
Spain|Madrid|Europe
Sri Lanka|Colombo|Asia
Sudan|Khartoum|Africa
Sweden|Stockholm|Europe
Switzerland|Bern|Europe
Syria|Damascus|Asia
Tanzania|Dodoma|Africa
Thailand|Bangkok|Asia
Tunisia|Tunis|Africa
Turkey|Ankara|Asia
Uganda|Kampala|Africa
Ukraine|Kyiv|Europe
United Kingdom|London|Europe
United States|Washington, D.C.|North America
Uruguay|Montevideo|South America
Venezuela|Caracas|South America
Vietnam|Hanoi|Asia
Zambia|Lusaka|Africa
Zimbabwe|Harare|Africa"""

QUESTIONS = [
    ("What is the capital of {c}?", 1),
    ("Which city is the capital of {c}?", 1),
    ("On which continent is {c}?", 2),
    ("{c} lies on which continent?", 2),
]

rows = [line.split("|") for line in TABLE.splitlines()]
dev_countries = set(random.Random(5).sample([r[0] for r in rows], 25))
d = Path(__file__).resolve().parents[1] / "data" / "qa"
d.mkdir(parents=True, exist_ok=True)
train, dev = [], []
for r in rows:
    for q, k in QUESTIONS:
        (dev if r[0] in dev_countries else train).append((q.format(c=r[0]), r[k]))
(d / "train.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in train))
(d / "dev.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in dev))
print(f"{len(train)} training questions, {len(dev)} held-out questions about {len(dev_countries)} other countries")
