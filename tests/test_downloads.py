"""Checkpoints that are not on this machine: files on the web, Hugging Face hub repositories (a local server stands
in for the hub through HF_ENDPOINT) and pretrained table names are downloaded once into the cache and verified
against what their source announces; a cut or corrupted download is never used. Bucket objects:
tests/test_buckets.py."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import jax

from mixer_jax import convert, models, paths
from mixer_jax.convert import files, pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=32)
COMMIT = 'a' * 40


class _Server(http.server.ThreadingHTTPServer):
  """Serves `files` ({url path: bytes}); `cut` paths send half their announced bytes, `swapped` paths other bytes
  than those their hub SHA-256 names. Answers as the hub does for its large files (X-Repo-Commit, X-Linked-Etag,
  X-Linked-Size)."""

  def __init__(self):
    super().__init__(('127.0.0.1', 0), _Handler)
    self.files, self.cut, self.swapped, self.gets = {}, set(), set(), []
    threading.Thread(target=self.serve_forever, daemon=True).start()

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.server_address[1]}'


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def _head(self) -> bytes | None:
    content = self.server.files.get(self.path.split('?')[0])
    if content is None:
      self.send_response(404)
      self.send_header('Content-Length', '0')
      self.end_headers()
      return None
    self.send_response(200)
    sha256 = hashlib.sha256(content).hexdigest()
    for name, value in (('Content-Length', len(content)), ('X-Repo-Commit', COMMIT), ('ETag', f'"{sha256}"'),
                        ('X-Linked-Etag', f'"{sha256}"'), ('X-Linked-Size', len(content))):
      self.send_header(name, str(value))
    self.end_headers()
    return content

  def do_HEAD(self):
    self._head()

  def do_GET(self):
    content = self._head()
    if content is None:
      return
    self.server.gets.append(self.path)
    if self.path in self.server.swapped:
      content = bytes(reversed(content))
    self.wfile.write(content[:len(content) // 2] if self.path in self.server.cut else content)


@pytest.fixture
def server():
  server = _Server()
  yield server
  server.shutdown()


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory) -> tuple[bytes, dict]:
  model = models.create('mixer_s16', num_classes=10, **TINY)
  variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(0)))
  path = str(tmp_path_factory.mktemp('npz') / 'tiny.npz')
  convert.save(variables, path, 'mixer_s16', 'npz')
  return open(path, 'rb').read(), variables


def test_a_web_file_is_downloaded_once_and_read_like_a_local_one(server, tiny_npz, tmp_path, monkeypatch):
  monkeypatch.setenv('MIXER_JAX_CACHE', str(tmp_path / 'cache'))
  content, variables = tiny_npz
  server.files['/models/tiny.npz'] = content
  url = f'{server.url}/models/tiny.npz'
  loaded = convert.load(url, 'mixer_s16', **TINY)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  convert.load(url, 'mixer_s16', **TINY)
  assert server.gets == ['/models/tiny.npz']  # the second load reads the cache
  assert open(files.local(url), 'rb').read() == content


@pytest.mark.slow
def test_a_cut_download_is_one_line_and_leaves_nothing_in_the_cache(server, tiny_npz, tmp_path, monkeypatch):
  monkeypatch.setenv('MIXER_JAX_CACHE', str(tmp_path / 'cache'))
  server.files['/tiny.npz'] = tiny_npz[0]
  server.cut.add('/tiny.npz')
  with pytest.raises(ValueError, match=r'^http://127\.0\.0\.1:\d+/tiny\.npz: the download (failed|holds)') as error:
    files.local(f'{server.url}/tiny.npz')
  assert '\n' not in str(error.value)
  assert paths.files(str(tmp_path / 'cache')) == []


@pytest.mark.slow
def test_a_missing_web_file_is_one_line(server, tmp_path, monkeypatch):
  monkeypatch.setenv('MIXER_JAX_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(FileNotFoundError, match=r'/nothing\.npz: the server answers 404'):
    files.checkpoint_format(f'{server.url}/nothing.npz')


def _hub_local(server, tmp_path, path: str, offline: bool = False) -> subprocess.CompletedProcess:
  """files.local(path) in a process whose huggingface_hub talks to `server` (it reads HF_ENDPOINT at import)."""
  env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE=str(int(offline)), HF_HOME=str(tmp_path / 'hf'),
             HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_TELEMETRY='1')
  code = f'from mixer_jax.convert import files; print(files.local({path!r}))'
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_hub_repositories_and_table_names_come_from_the_hub_verified(server, tiny_npz, tmp_path):
  content = json.dumps({'not': 'weights'}).encode() * 50  # any bytes: what is checked is that they arrive intact
  server.files['/timm/tiny_mixer/resolve/main/model.safetensors'] = content
  server.files['/timm/davit_tiny.msft_in1k/resolve/main/model.safetensors'] = content[::-1]
  run = _hub_local(server, tmp_path, 'hf-hub:timm/tiny_mixer')
  assert run.returncode == 0, run.stderr
  assert open(run.stdout.strip(), 'rb').read() == content
  assert pretrained.source('davit_tiny.msft_in1k') == 'hf-hub:timm/davit_tiny.msft_in1k'
  run = _hub_local(server, tmp_path, 'davit_tiny.msft_in1k')
  assert run.returncode == 0, run.stderr
  assert open(run.stdout.strip(), 'rb').read() == content[::-1]
  requests = len(server.gets)
  run = _hub_local(server, tmp_path, 'hf-hub:timm/tiny_mixer', offline=True)  # HF_HUB_OFFLINE=1: the cached copy
  assert run.returncode == 0 and open(run.stdout.strip(), 'rb').read() == content and len(server.gets) == requests


@pytest.mark.slow
def test_a_hub_file_that_differs_from_its_published_hash_is_refused(server, tmp_path):
  server.files['/timm/tiny_mixer/resolve/main/model.safetensors'] = b'0123456789' * 100
  server.swapped.add('/timm/tiny_mixer/resolve/main/model.safetensors')
  run = _hub_local(server, tmp_path, 'hf-hub:timm/tiny_mixer')
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1].endswith(
      'hf-hub:timm/tiny_mixer: the downloaded model.safetensors differs from the SHA-256 the hub publishes: run again')
  server.swapped.clear()  # the bad copy was not kept: the next run downloads the file again
  run = _hub_local(server, tmp_path, 'hf-hub:timm/tiny_mixer')
  assert run.returncode == 0 and open(run.stdout.strip(), 'rb').read() == b'0123456789' * 100
