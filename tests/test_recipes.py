"""A task recipe resolves one way at every entry point: the pipeline, the CLI (library captioning) and the server.

InstructBLIP's caption recipe asks for at least 10 new tokens; a user's smaller ``max_new_tokens`` lowers that
minimum everywhere, while an explicit ``min_new_tokens`` above ``max_new_tokens`` is refused, named as the user gave
it (a flag on the command line, a field in a request).
"""

import base64
import http.client
import json

import pytest
from conftest import FIXTURES, REFERENCE

from mlx_blip2.cli import main
from mlx_blip2.generation.recipes import (CAPTION_DEFAULTS, INSTRUCT_CAPTION_DEFAULTS, VQA_DEFAULTS, OptionError,
                                          resolve_recipe)
from mlx_blip2.pipelines import load
from mlx_blip2.server import missing_server_packages

CHECKPOINTS = ["tiny-instructblip-vicuna", "tiny-instructblip-flan-t5", "tiny-blip2-opt"]
IMAGE = REFERENCE / "image0.png"
NEEDS_SERVER = pytest.mark.skipif(bool(missing_server_packages()), reason="the server extra is not installed")


def post(server, path: str, payload: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint(request):
    return FIXTURES / request.param, load(FIXTURES / request.param)


def test_a_smaller_max_new_tokens_lowers_the_recipes_minimum():
    options = resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 5})
    assert (options.min_new_tokens, options.max_new_tokens, options.num_beams) == (5, 5, 5)
    assert resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 40}).min_new_tokens == 10
    assert resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 3, "min_new_tokens": 2}).min_new_tokens == 2
    assert resolve_recipe(CAPTION_DEFAULTS, {"max_new_tokens": 1}).min_new_tokens == 1
    assert resolve_recipe(VQA_DEFAULTS, {"max_new_tokens": 4}, stream=True).min_new_tokens == 1


def test_an_explicit_minimum_above_the_maximum_is_refused_by_its_name():
    with pytest.raises(OptionError) as e:
        resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 3, "min_new_tokens": 9})
    assert e.value.option == "min_new_tokens" and "min_new_tokens (9)" in str(e.value)
    flags = {"min_new_tokens": "--min-new-tokens", "max_new_tokens": "--max-new-tokens"}
    with pytest.raises(OptionError) as e:
        resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 3, "min_new_tokens": 9}, names=flags)
    assert e.value.option == "--min-new-tokens"
    assert str(e.value) == "--min-new-tokens (9) must not exceed --max-new-tokens (3)"
    with pytest.raises(OptionError) as e:  # a bad maximum is named, not hidden behind the recipe's minimum
        resolve_recipe(INSTRUCT_CAPTION_DEFAULTS, {"max_new_tokens": 0})
    assert e.value.option == "max_new_tokens"


@pytest.mark.parametrize("n", [3, 5, 8])
def test_cli_caption_with_a_small_max_new_tokens(checkpoint, n, capsys):
    directory, pipe = checkpoint
    assert main(["caption", str(IMAGE), "-m", str(directory), "--max-new-tokens", str(n)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == pipe.caption(IMAGE, max_new_tokens=n), captured.err


def test_cli_refuses_a_minimum_above_the_maximum_naming_the_flag(capsys):
    directory = FIXTURES / "tiny-instructblip-vicuna"
    args = ["caption", str(IMAGE), "-m", str(directory), "--max-new-tokens", "3", "--min-new-tokens", "9"]
    assert main(args) == 2
    assert "--min-new-tokens (9) must not exceed --max-new-tokens (3)" in capsys.readouterr().err


@NEEDS_SERVER
def test_server_caption_with_a_small_max_new_tokens(checkpoint):
    from mlx_blip2.server import BackgroundServer, create_app

    directory, pipe = checkpoint
    image = base64.b64encode(IMAGE.read_bytes()).decode()
    with BackgroundServer(create_app(pipe, model_name=directory.name)) as server:
        for n in (3, 5, 8):
            code, body = post(server, "/v1/caption", {"image": image, "max_new_tokens": n})
            assert code == 200, body
            assert body["caption"] == pipe.caption(IMAGE, max_new_tokens=n)
        code, body = post(server, "/v1/caption", {"image": image, "max_new_tokens": 3, "min_new_tokens": 9})
        assert code == 400 and body["error"]["param"] == "min_new_tokens", body
