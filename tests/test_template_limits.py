"""Chat templates are refused *before* they build something huge: a long source, a huge pad or
power, deep nesting. Each hostile case runs in a child process with its address space capped, so
it must give a typed error quickly and without memory growth; real templates render as before.
Real model for the chat parts."""

from __future__ import annotations

import json
import subprocess
import sys

import jinja2
import pytest

from edgesink.chat import CHATML, MAX_TEMPLATE_CHARS, ChatTemplate
from edgesink.template_guard import GuardedSandbox, TemplateLimitError
from test_chat_guarantees import FOLDING
from test_cli import FAST, GREEDY, ok, run

HOSTILE = {
    "2.5 MB source": "{{ 'x' }}" * 280_000,
    "pad to 3e9": "{{ 'a'|center(3*10**9) }}",
    "huge power chain": "{% set c=((7**256)**256)**6 %}{{ c**128>0 }}",
    "300 nested brackets": "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
    # The same blow-ups by other routes: each one C call that could not be interrupted.
    "str method pad": "{{ 'a'.ljust(3*10**9) }}",
    "nested format width": "{{ '{:>{}}'.format('a', 3*10**9) }}",
    "star % width": "{{ '%*s' % (3*10**9, 'a') }}",
    "format filter width": "{{ '%*s'|format(3*10**9, 'a') }}",
    "indent width": "{{ ('a\\n' * 1000)|indent(10**7) }}",
    "join of repeats": "{% set a = 'x' * 900000 %}{{ [" + "a, " * 1200 + "]|join }}",
    "join of a generator": "{{ 'y'.join(range(5000)|map('string')|map('center', 900000)) }}",
    "list of a generator": "{{ range(5000)|map('string')|map('center', 900000)|list|length }}",
    "repeat of a long list": "{{ ['x' * 900000] * 5000 }}",
    "nested literals": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x] %}"
                       "{% endfor %}{{ ns.x }}",
    "captured block": "{% set a = 'x' * 900000 %}{% set b %}{% for i in range(5000) %}{{ a }}{% endfor %}"
                      "{% endset %}{{ b|length }}",
    "batch padding": "{{ [1]|batch(3*10**9, 0)|list }}",
    "indented json": "{{ [[[[1]]]]|tojson(indent=10**8) }}",
    "quadratic sum": "{{ range(400)|map('string')|map('center', 1000)|map('list')|list|sum(start=[])|length }}",
}

# Peak memory is read from VmHWM, which starts afresh at exec. ru_maxrss would not do: Linux folds the
# forking process's peak into the child's, so under a large pytest process growth would read as 0.
CHILD = """
import json, resource, sys, time
def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
from edgesink.chat import ChatTemplate, TemplateRenderError
source = sys.stdin.read()
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, hard))  # a template that allocates gigabytes fails here
before = peak_kib()
start = time.process_time()  # CPU time: a busy machine stretches the wall clock, not the work
try:
    ChatTemplate(source).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    error = None
except TemplateRenderError as e:
    error = str(e)
print(json.dumps({"error": error, "seconds": time.process_time() - start,
                  "grew_mb": (peak_kib() - before) / 1024}))
"""


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_refused_quickly_and_small(name):
    result = subprocess.run([sys.executable, "-c", CHILD], input=HOSTILE[name], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    # Refused by a limit, not by running out of memory under the cap or by a crash.
    assert outcome["error"] is not None and "memory" not in outcome["error"], outcome
    assert ("ran away (the template" in outcome["error"] or "nests too deeply" in outcome["error"]
            or "characters long" in outcome["error"]), outcome
    assert outcome["seconds"] < 10 and outcome["grew_mb"] < 200, outcome  # CPU seconds: see CHILD


def test_integers_stay_small():
    """A product of two long integers is refused before Python multiplies them."""
    big = 7 ** 14_000  # 39,000 bits: allowed, but its square is not
    template = GuardedSandbox(max_chars=1_000_000).from_string("{{ (big * big) > 0 }}")
    with pytest.raises(TemplateLimitError, match="an integer of about 78,6"):
        template.render(big=big)
    assert template.render(big=7 ** 2_000) == "True"


def plain(source: str) -> jinja2.Environment:
    """The same template in Jinja's own sandbox, without edgesink's limits."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


# Everything the guard measures, used at the sizes real templates use them.
FEATURES = """{%- set ns = namespace(tools='', n=0) -%}
{%- macro box(text) %}[{{ text|center(12) }}]{% endmacro -%}
{%- for tool in tools %}{% set ns.tools = ns.tools ~ (tool|tojson(indent=2)) ~ '\\n' %}
{%- set ns.n = ns.n + 1 %}{% endfor -%}
{{ bos_token }}{{ box('tools') }} {{ ns.n }} {{ 2 ** 10 }} {{ 3 * 4 }} {{ '-' * 8 }} {{ [1, 2] * 2 }}
{{ ns.tools|indent(4, first=True) }}
{%- for m in messages %}
{{ '%-9s|%5.1f|' % (m['role'], loop.index * 1.5) }}{{ '{:>10}/{}'.format(m['role'], loop.length) }}
{{ m['content']|trim|replace('\\ue000', '<')|wordwrap(20) }} {{ m['content'].ljust(30, '.') }}
{{- messages|map(attribute='role')|join(', ') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{% set body %}{{ m['role'].upper() }}:{{ m['content'][:3] }}{% endset %}{{ body|truncate(9) }} {{ [1, 2, 3]|sum }}
{%- endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

TOOLS = [{"name": "search", "parameters": {"query": {"type": "string", "description": "what to look up"}}},
         {"name": "clock", "parameters": {}}]


def conversation(n: int) -> list[dict]:
    roles = ["system"] + ["user", "assistant"] * n
    return [{"role": role, "content": f"\ue000{i}\ue001 message {i}\twith  spaces "} for i, role in enumerate(roles)]


@pytest.mark.parametrize("source", ["model", "CHATML", "FOLDING", "FEATURES"])
def test_real_templates_render_as_plain_jinja_does(model, source):
    """The limits change nothing for real templates: same text as Jinja's own sandbox gives."""
    text = {"model": model.chat_template, "CHATML": CHATML, "FOLDING": FOLDING, "FEATURES": FEATURES}[source]
    variables = {"bos_token": "<s>", "eos_token": "", "tools": TOOLS}
    for messages in (conversation(0), conversation(1), conversation(20)):
        for prompt in (False, True):
            guarded = GuardedSandbox(trim_blocks=True, lstrip_blocks=True, max_chars=1_000_000).from_string(text)
            expected = plain(text).render(messages=messages, add_generation_prompt=prompt, **variables)
            assert guarded.render(messages=messages, add_generation_prompt=prompt, **variables) == expected
    rendered = ChatTemplate(text, bos_token="<s>").render(conversation(2), add_generation_prompt=True)
    assert rendered == plain(text).render(messages=conversation(2), add_generation_prompt=True, bos_token="<s>",
                                          eos_token="")


def test_a_template_just_under_the_size_limit_still_compiles():
    source = "{{ 'x' }}" * (MAX_TEMPLATE_CHARS // 9)
    assert len(ChatTemplate(source).render([], add_generation_prompt=False)) == MAX_TEMPLATE_CHARS // 9


def saved_chat_with_template(model, path, template: str) -> None:
    """A real chat saved to ``path``, its (crafted) template replaced by ``template``."""
    with model.session(n_ctx=256, n_threads=1) as s:
        s.start_chat("Be brief.")
        "".join(s.chat("Hello", max_tokens=4, top_k=1, seed=1))
        s.conversation.template_source = template  # what a crafted session file would carry
        s.save(path)


def test_chat_survives_loading_session_files_with_hostile_templates(model, tmp_path):
    names = ["2.5 MB source", "pad to 3e9", "huge power chain", "300 nested brackets"]
    paths = []
    for i, name in enumerate(names):
        paths.append(tmp_path / f"hostile{i}.state")
        saved_chat_with_template(model, paths[-1], HOSTILE[name])
    script = "Hi\n/stats\n" + "".join(f"/load {p}\n" for p in paths) + "/stats\nWhat did I say?\n/stats\n/exit\n"
    out = ok(run("chat", "--max-tokens", 8, *GREEDY, *FAST, input=script)).stdout
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, out
    refused = "error: the session file's bookkeeping is inconsistent (chat template"
    assert all(line.startswith(refused) for line in errors)
    stats = [line for line in out.splitlines() if line.startswith("tokens seen")]
    assert stats[0] == stats[1] != stats[2]  # the loads changed nothing; the conversation went on


def test_session_load_refuses_a_hostile_template_and_keeps_the_session(model, tmp_path):
    from edgesink.persistence import SessionFileError

    path = tmp_path / "hostile.state"
    saved_chat_with_template(model, path, HOSTILE["300 nested brackets"])
    with model.session(n_ctx=256, n_threads=1) as s:
        s.start_chat("You are kind.")
        "".join(s.chat("Hi", max_tokens=4, top_k=1, seed=2))
        before = (s.messages, s.cached_tokens())
        with pytest.raises(SessionFileError, match="chat template does not parse"):
            s.load(path)
        assert (s.messages, s.cached_tokens()) == before
