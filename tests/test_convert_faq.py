"""FAQ pages of different generators → exact question/answer pairs with their sources.

Each fixture in tests/assets/convert/faq mimics one generator's real markup, boilerplate
included (WordPress + Elementor + Yoast, Sphinx, Read the Docs, MkDocs Material, Zendesk
Guide, Bootstrap with schema.org microdata, JSON-LD FAQPage, 1990s hand-written HTML, GitHub
Markdown, plain text); the expected pairs were checked by hand against each page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.data.convert.faq import extract_pairs, looks_like_question
from specialize.data.htmltext import clean_page, render
from specialize.data.htmltree import parse_html

FAQ = Path(__file__).parent / "assets" / "convert" / "faq"

# file -> [(question, answer, source fields besides file and converter)]
EXPECTED = {
    'bootstrap_schema.html': [
        ('How long does delivery take?',
         'Two to four working days inside the EU.\n\nExpress delivery arrives the next working day.',
         {'anchor': 'headingOne', 'line': 23, 'via': 'microdata'}),
        ('Tracking a parcel',
         'Every label has a tracking number. Enter it on the tracking page.',
         {'anchor': 'headingTwo', 'line': 36, 'via': 'microdata'}),
        ('Invoices for companies',
         'Add your VAT number under Settings › Billing; it appears on every invoice after that.',
         {'anchor': 'headingThree', 'line': 55, 'via': 'accordion'}),
        ('Payment methods',
         'We accept:\n\n- credit cards\n- SEPA direct debit\n- PayPal',
         {'anchor': 'headingFour', 'line': 69, 'via': 'accordion'}),
        ('Can I return an opened parcel?',
         'Yes, within 14 days, if the contents are undamaged.',
         {'anchor': 'collapse5', 'line': 88, 'via': 'accordion'}),
    ],
    'docbook_faq.html': [  # nested question sections; navigation bars and the table of contents left out
        ('How do I install Widgetron?',
         'Widgetron runs on Linux, macOS and Windows. There are two ways to install it; pick the one that fits '
         'how you deploy.', {'anchor': 'faq-install', 'line': 2, 'via': 'heading'}),
        ('Can I install it with pip?', 'Yes: run `pip install widgetron` in a virtual environment.',
         {'anchor': 'faq-pip', 'line': 5, 'via': 'heading'}),
        ('Can I build it from source?', 'Yes. Clone the repository and run `make install`; you need a C compiler.',
         {'anchor': 'faq-source', 'line': 7, 'via': 'heading'}),
        ('Why does the service not start?',
         'Almost always because of the port or the configuration file; the service log names which.',
         {'anchor': 'faq-start', 'line': 10, 'via': 'heading'}),
        ('What if the port is already in use?', 'Set another port with `--port`, or stop the program that holds it.',
         {'anchor': 'faq-port', 'line': 12, 'via': 'heading'}),
        ('What if it cannot read its configuration?', 'Make the file readable by the `widgetron` user.',
         {'anchor': 'faq-perm', 'line': 14, 'via': 'heading'}),
        ('Where are the log files?', 'In `/var/log/widgetron/`, one file per day.',
         {'anchor': 'faq-logs', 'line': 17, 'via': 'heading'}),
    ],
    'github_faq.md': [
        ('What is `quill`?',
         '`quill` is a command-line tool that formats Markdown tables. It reads from standard input when no '
         'file is given.',
         {'anchor': 'what-is-quill', 'line': 8, 'via': 'heading'}),
        ('Installing behind a proxy',
         'Set the usual variables before installing:\n\n```bash\n'
         'export HTTPS_PROXY=http://proxy.internal:3128\npip install quill\n```',
         {'anchor': 'installing-behind-a-proxy', 'line': 13, 'via': 'heading'}),
        ('Why does quill print `E042`?',
         'The table has rows with different column counts. Run with `--explain` to see the row:\n\n'
         '1. `quill --explain table.md`\n2. fix the reported row',
         {'line': 24, 'via': 'details'}),
        ('Does quill change my file in place?',
         'Only with `--write`; otherwise it prints the result.',
         {'line': 34, 'via': 'q-prefix'}),
        ('Which Python versions are supported?',
         'Python 3.9 and newer.',
         {'line': 37, 'via': 'q-prefix'}),
    ],
    'handwritten.html': [
        ('Does Kestrel support IMAP?',
         'Yes. IMAP and POP3 are both supported; IMAP is the default for new accounts.',
         {'anchor': 'q1', 'line': 15, 'via': 'q-prefix'}),
        ('Where is my mail stored?',
         'In the Mail folder of your profile:\n\n```\n  Windows: %APPDATA%\\Kestrel\\Mail\n'
         '  Linux:   ~/.kestrel/mail\n```',
         {'anchor': 'q2', 'line': 18, 'via': 'q-prefix'}),
        ('Why does Kestrel ask for my password every time?',
         'The password store is locked. Unlock it under Tools > Passwords.',
         {'line': 27, 'via': 'dl'}),
        ('Sending fails with "relay denied"',
         'Your server needs authentication for outgoing mail.\n\n'
         'Tick My server requires authentication in the account settings.',
         {'line': 29, 'via': 'dl'}),
    ],
    'jsonld_faq.html': [
        ('Do solar panels work in winter?',
         'Yes. Output drops with shorter days, but cold panels are more efficient.',
         {'line': 36, 'via': 'heading'}),
        ('How much does a solar installation cost?',
         'A typical 6 kW system costs between €7,000 and €9,000 installed.\n\n- panels and inverter\n'
         '- mounting and wiring',
         {'line': 6, 'via': 'json-ld'}),
    ],
    'mkdocs_faq.html': [
        ('Installing on Windows',
         'Use the installer from the releases page, or `winget`:\n\n```\nwinget install Tidepool.Tidepool\n'
         '```\n\nWarning\n\nWindows 7 is not supported.',
         {'anchor': 'installing-on-windows', 'line': 39, 'via': 'heading'}),
        ('Changing the default port',
         'Set `port` in `tidepool.yml`:\n\nKey | Default\n`port` | `8080`\n\nRunning two instances\n'
         'Give each instance its own port and data folder.',
         {'anchor': 'changing-the-default-port', 'line': 47, 'via': 'heading'}),
        ('Where are logs stored?',
         '1. Linux: `~/.local/state/tidepool/`\n2. macOS: `~/Library/Logs/Tidepool/`',
         {'anchor': 'where-are-logs-stored', 'line': 67, 'via': 'heading'}),
    ],
    'plain_qa.txt': [
        ('How often does Orbit back up my files?',
         'Every hour by default. You can change the interval under Settings > Schedule.',
         {'line': 4, 'via': 'q-prefix'}),
        ('Can I restore a single file from an older backup?',
         'Yes. Open the History view, pick the date and right-click the file.',
         {'line': 8, 'via': 'q-prefix'}),
        ('Is my data encrypted?',
         'Yes, with AES-256 before it leaves your computer.',
         {'line': 13, 'via': 'q-prefix'}),
        ('What happens when my disk is full?',
         'Orbit deletes the oldest backups first and warns you.',
         {'line': 15, 'via': 'q-prefix'}),
    ],
    'plain_questions.txt': [
        ('How many books can I borrow at once?',
         'Up to twelve books and four DVDs.',
         {'line': 3, 'via': 'text'}),
        ('How do I renew a loan?',
         'Online under "My account", or at any desk. Loans can be renewed twice.',
         {'line': 6, 'via': 'text'}),
        ('Do you charge late fees?',
         'No. We stopped charging late fees in 2021.',
         {'line': 10, 'via': 'text'}),
    ],
    'rtd_sections_faq.html': [
        ('Readings differ from the vendor tool',
         'The vendor tool rounds to one decimal; PyGauge returns raw values.\n\nVendor tool output\n\n```\n'
         'Pressure : 1.0 bar\n```\n\nWhat’s going on?\n\nPass `rounding=1` to get the vendor’s numbers.',
         {'anchor': 'readings-differ-from-the-vendor-tool', 'line': 30, 'via': 'heading'}),
        ('I would like a faster parser',
         'Install the optional `fastgauge` extra.',
         {'anchor': 'i-would-like-a-faster-parser', 'line': 44, 'via': 'heading'}),
        ('I’m getting an error! How do I debug it?',
         'Set the `PYGAUGE_DEBUG=1` environment variable.',
         {'anchor': 'i-m-getting-an-error-how-do-i-debug-it', 'line': 48, 'via': 'heading'}),
    ],
    'sphinx_faq.html': [
        ('What is Widgetry?',
         'Widgetry is a library for building small user interfaces from plain Python functions. It runs on '
         'Linux, macOS and Windows.\n\nSee The Widgetry Tutorial for a first tour.',
         {'anchor': 'what-is-widgetry', 'line': 40, 'via': 'heading'}),
        ('How do I install Widgetry?',
         'Install it from PyPI:\n\n```\n$ python -m pip install widgetry\n```\n\n'
         'Then check the version with `widgetry.__version__`.',
         {'anchor': 'how-do-i-install-widgetry', 'line': 46, 'via': 'heading'}),
        ('Is Widgetry stable?',
         'Yes. Releases follow these rules:\n\n- a minor release every six months;\n'
         '- bug-fix releases when needed, with no new features.\n\nwidgetry.version_info()\n'
         '  Return the version as a tuple.',
         {'anchor': 'is-widgetry-stable', 'line': 57, 'via': 'heading'}),
        ('Why are widgets immutable?',
         'Note\n\nOnly the widget tree is immutable; state lives in stores.\n\n'
         'Immutable trees can be compared cheaply, which makes redraws fast.\n\nOperation | Cost\n'
         'compare | O(1)\nredraw | O(changed)',
         {'anchor': 'why-are-widgets-immutable', 'line': 71, 'via': 'heading'}),
    ],
    'wordpress_accordion.html': [
        ('How long is a lesson?',
         'Lessons are 30, 45 or 60 minutes.\n\nBeginners under eight usually start with 30 minutes.',
         {'anchor': 'elementor-tab-title-1731', 'line': 37, 'via': 'accordion'}),
        ('Missed lessons and make-up policy',
         'Cancel at least 24 hours ahead and we schedule a make-up lesson:\n\n- one make-up per month,\n'
         '- within four weeks of the missed lesson.',
         {'anchor': 'elementor-tab-title-1732', 'line': 47, 'via': 'accordion'}),
        ('Do you teach adults?',
         'Yes. About a third of our students are adults, and lessons are planned around your goals.',
         {'anchor': 'faq-question-1700000000001', 'line': 65, 'via': 'class'}),
        ('Can I rent a piano from you?',
         'We rent digital pianos for $35 a month.\nDelivery within the city is free.',
         {'anchor': 'faq-question-1700000000002', 'line': 65, 'via': 'class'}),
    ],
    'zendesk_article.html': [
        ('How do I reset my password?',
         'If you forgot your password, you can set a new one from the sign-in page.\n\n'
         '1. Go to app.example.com/login and click Forgot password?\n'
         '2. Enter the email address of your account.\n'
         '3. Open the link in the email we send you. The link expires after 24 hours.\n\n'
         'Note: if your company uses single sign-on, reset the password with your identity provider instead.',
         {'line': 47, 'via': 'heading'}),
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_pairs_exact(name):
    path = FAQ / name
    rows, _ = extract_pairs(path, path.read_text(encoding="utf-8"), f"faq/{name}")
    got = [(r["question"], r["answer"], {k: v for k, v in r["source"].items() if k not in ("file", "converter")})
           for r in rows]
    assert got == EXPECTED[name]
    assert all(r["source"]["file"] == f"faq/{name}" and r["source"]["converter"] == "faq" for r in rows)


def test_dropped_reasons():
    path = FAQ / "github_faq.md"
    _, dropped = extract_pairs(path, path.read_text(encoding="utf-8"), "github_faq.md")
    assert dropped == {"boilerplate question": 1}  # "## Still have questions?"
    html = "<h1>FAQ</h1><h2>Is it free?</h2><h2>Can I pay by card?</h2><p>Yes.</p>"
    rows, dropped = extract_pairs(Path("x.html"), html, "x.html")
    assert [r["question"] for r in rows] == ["Can I pay by card?"]
    assert dropped == {"empty answer": 1}


def test_boilerplate_is_never_an_answer():
    # Zendesk: article votes, "Have more questions?", "Return to top", related articles, sidebar.
    path = FAQ / "zendesk_article.html"
    rows, _ = extract_pairs(path, path.read_text(encoding="utf-8"), "z.html")
    text = rows[0]["answer"]
    for junk in ("helpful", "Submit a request", "Return to top", "Related articles", "Articles in this section",
                 "Dana", "Follow", "Facebook"):
        assert junk not in text


def test_answers_stop_before_the_next_question_and_section():
    html = """<html><head><title>Help</title></head><body><main>
    <h2>Frequently asked questions</h2>
    <h3>Can I cancel?</h3><p>Yes.</p>
    <h3>How do I cancel?</h3><p>Open <b>Billing</b>.</p><h4>On mobile</h4><p>Use the app menu.</p>
    <h2>Pricing</h2><p>Plans start at $5.</p>
    <h3>Enterprise</h3><p>Talk to sales.</p>
    </main></body></html>"""
    rows, _ = extract_pairs(Path("help.html"), html, "help.html")
    # "On mobile" is a sub-heading of an answer; "Pricing" ends the FAQ section, so
    # "Enterprise" (no question mark, outside the FAQ section) is not a question.
    assert [(r["question"], r["answer"]) for r in rows] == [
        ("Can I cancel?", "Yes."),
        ("How do I cancel?", "Open Billing.\n\nOn mobile\n\nUse the app menu."),
    ]


def test_one_paragraph_faq_with_line_breaks():
    html = "<title>FAQ</title><p><b>How do I book?</b><br>Call us.<br><br><b>Can I bring my dog?</b><br>Yes.</p>"
    rows, _ = extract_pairs(Path("f.html"), html, "f.html")
    assert [(r["question"], r["answer"]) for r in rows] == [("How do I book?", "Call us."),
                                                             ("Can I bring my dog?", "Yes.")]


def test_title_question_over_questions_is_not_a_question():
    html = """<h1>How can we help?</h1><p>Search below.</p>
    <h2>Shipping</h2><h3>Do you ship abroad?</h3><p>To the EU.</p>"""
    rows, _ = extract_pairs(Path("h.html"), html, "h.html")
    assert [(r["question"], r["answer"]) for r in rows] == [("Do you ship abroad?", "To the EU.")]


def test_a_section_question_with_an_introduction_keeps_it_as_its_answer():
    # DocBook-style nesting: the parent question is answered by its introduction, up to the first
    # sub-question; without an introduction it stays a heading over its questions.
    html = """<title>FAQ</title><h2>2. How do I pay?</h2><p>By card or by invoice.</p>
    <h3>2.1. Which cards?</h3><p>Visa.</p><h3>2.2. Can I get an invoice?</h3><p>Yes.</p>
    <h2>3. Why was I charged twice?</h2><h3>3.1. Is it a pending hold?</h3><p>It drops off in a day.</p>"""
    rows, _ = extract_pairs(Path("p.html"), html, "p.html")
    assert [(r["question"], r["answer"]) for r in rows] == [
        ("How do I pay?", "By card or by invoice."), ("Which cards?", "Visa."), ("Can I get an invoice?", "Yes."),
        ("Is it a pending hold?", "It drops off in a day.")]


def test_accordion_category_holds_questions():
    # A <details> whose body holds further questions is a category, not a question.
    html = """<title>FAQ</title><details><summary>Billing</summary>
      <details><summary>Can I get an invoice?</summary><p>Yes, in Settings.</p></details>
      <details><summary>Which cards?</summary><p>Visa and Mastercard.</p></details>
    </details>"""
    rows, _ = extract_pairs(Path("a.html"), html, "a.html")
    assert [(r["question"], r["answer"]) for r in rows] == [("Can I get an invoice?", "Yes, in Settings."),
                                                             ("Which cards?", "Visa and Mastercard.")]


def test_render_keeps_lists_and_code_readable():
    root = parse_html("<div><p>Steps:</p><ol start=3><li>one<ul><li>a</li><li>b\nc</li></ul></li><li><p>two</p>"
                      "<p>more</p></li></ol><pre><code class='language-py'>x = 1\n  y = 2\n</code></pre>"
                      "<p>Use <code>pip</code> &amp; go<br>now.</p></div>")
    assert render(root) == ("Steps:\n\n3. one\n   - a\n   - b c\n4. two\n   more\n\n```py\nx = 1\n  y = 2\n```"
                            "\n\nUse `pip` & go\nnow.")


def test_clean_page_drops_navigation_and_furniture():
    root = parse_html("""<body><a class="skip-link" href="#c">Skip to content</a><header><nav>Menu</nav></header>
      <div class="cookie-banner">We use cookies</div><main><article><header class="entry-header"><h1>T</h1>
      <div class="entry-meta">Posted by Ann</div></header><p>Body <a href="#top">Back to top</a></p>
      <form><input name="q"><button>Search</button></form><script>var x;</script></article></main>
      <aside>Sidebar</aside><footer>Copyright</footer></body>""")
    assert render(clean_page(root)) == "T\n\nBody"


@pytest.mark.parametrize("text, expected", [
    ("How do I reset my password?", True), ("Q: Shipping costs", True), ("Can I pay by card", True),
    ("What's new?", True), ("How it works", False), ("Installation", False), ("Pricing", False),
    ("How to fix it:", False), ("Q: How to fix it:", True), ("هل الخدمة مجانية؟", True),
])
def test_looks_like_question(text, expected):
    assert looks_like_question(text) is expected


def test_malformed_and_deeply_nested_html_still_reads():
    html = ("<title>FAQ</title>" + "<div>" * 5000 + "<h2>Is it deep?</h2><p>Very.</br>Really.</p>"
            + "<section><span>" * 3000 + "<h2>هل هو عميق؟</h2><p>نعم")
    rows, _ = extract_pairs(Path("deep.html"), html, "deep.html")
    assert [(r["question"], r["answer"]) for r in rows] == [("Is it deep?", "Very.\nReally."), ("هل هو عميق؟", "نعم")]


DETAILS_HTML = ("<title>FAQ</title>"
                "<details><summary>How do I pay?</summary>By card, or by <b>invoice</b> for teams.</details>"
                "<details><summary>Can I get a refund?</summary>\n  Yes, within 30 days.\n</details>"
                "<details><summary>Which plans are there?</summary>Three:<ul><li>Free</li><li>Team</li></ul>"
                "Switch any time under <code>Settings</code>.</details>")
DETAILS_MD = ("# FAQ\n\n<details>\n<summary>How do I pay?</summary>\nBy card, or by <b>invoice</b> for teams.\n"
              "</details>\n\n<details><summary>Can I get a refund?</summary>Yes, within 30 days.</details>\n\n"
              "<details>\n<summary>Which plans are there?</summary>\n\nThree:\n\n- Free\n- Team\n\n"
              "Switch any time under `Settings`.\n\n</details>\n")


@pytest.mark.parametrize("name, text, lines", [("f.html", DETAILS_HTML, [1, 1, 3]), ("f.md", DETAILS_MD, [3, 8, 10])])
def test_details_answer_keeps_text_outside_tags(name, text, lines):
    # Text right after </summary> is the answer too: mixed with tags, without any tag, or around a list.
    rows, dropped = extract_pairs(Path(name), text, name)
    assert [(r["question"], r["answer"], r["source"]) for r in rows] == [
        (question, answer, {"file": name, "line": line, "converter": "faq", "via": "details"})
        for (question, answer), line in zip([
            ("How do I pay?", "By card, or by invoice for teams."),
            ("Can I get a refund?", "Yes, within 30 days."),
            ("Which plans are there?", "Three:\n\n- Free\n- Team\n\nSwitch any time under `Settings`.")], lines)]
    assert dropped == {}


def test_jsonld_answer_is_html_only_with_real_tags():
    html = """<html><head><title>Help</title><script type="application/ld+json">{"@type": "FAQPage",
      "mainEntity": [
        {"@type": "Question", "name": "How do I confirm?",
         "acceptedAnswer": {"text": "Press <Enter> to confirm,\\nor <Esc> & <Select> to retry."}},
        {"@type": "Question", "name": "Where is the manual?",
         "acceptedAnswer": {"text": "If a < b > c, see <a href=\\"/m\\">the <b>manual</b></a>."}},
        {"@type": "Question", "name": "Two lines?", "acceptedAnswer": {"text": "One<br>Two"}}]}
    </script></head><body><p>Hi</p></body></html>"""
    rows, _ = extract_pairs(Path("j.html"), html, "j.html")
    assert [(r["question"], r["answer"], r["source"]["via"]) for r in rows] == [
        ("How do I confirm?", "Press <Enter> to confirm,\nor <Esc> & <Select> to retry.", "json-ld"),
        ("Where is the manual?", "If a < b > c, see the manual.", "json-ld"),
        ("Two lines?", "One\nTwo", "json-ld")]
