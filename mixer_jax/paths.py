"""The paths a user gives (workdirs, checkpoints, data folders, outputs), local or in a bucket (`gs://`): their
spelling, the files the project itself writes under them, and the bucket check a run makes before anything else.

Spelling: a command may be run from any directory and its workdir read later from another one (`eval.py` reads the
config.json that `train.py` wrote), and orbax refuses relative paths, so every path is made absolute where it
enters: `~` is expanded, relative paths are taken from the current directory, and a trailing slash is dropped. URLs
(`gs://bucket/run`) are left as they are.

Buckets: a run reaches Cloud Storage through three clients. orbax writes a checkpoint's arrays through tensorstore
and commits the step by writing its `commit_success.txt` last (a bucket cannot rename a folder atomically);
everything else the project writes (metrics.jsonl, config.json, checkpoint folders moved aside) goes through
`at()`, etils.epath on fsspec/gcsfs; TensorBoard events and tfds datasets go through TensorFlow's own GCS file
system. epath is kept off TensorFlow's (`EPATH_USE_TF=0`): through it orbax loops forever on a missing bucket.
`STORAGE_EMULATOR_HOST=http://HOST:PORT`, the variable Google's storage clients read, points tensorstore and gcsfs
at a GCS emulator too (`configure_clients` derives their own settings from it); TensorFlow's file system has
Google's endpoint built in and reads no such variable. A request that fails is retried `bucket_retries()` times, 1 s,
2 s, 4 s ... 32 s apart, by tensorstore and TensorFlow (gcsfs has its own 6 tries): bounded, so that a bucket that
stopped answering ends the run with one line instead of leaving it training for a quarter of an hour on checkpoints
that never commit.

Files elsewhere (`local_copy`): a checkpoint file in a bucket, on the web or on the Hugging Face hub is copied once
into a cache and verified against what its source announces before anything reads it.

Must not: decide what a run writes or when (the trainer and checkpoint modules do).
"""
import base64
import hashlib
import http.client
import os
import re
import shutil
import socket
import urllib.error
import urllib.request

from etils import epath

CHECK_SECONDS = 10  # how long the bucket check waits for each request before it calls the bucket unreachable
RETRIES_ENV = 'MIXER_JAX_BUCKET_RETRIES'
BUCKET_RETRIES = 8  # about 2 minutes of retries before a failing request is given up
HUB = 'hf-hub:'  # hf-hub:OWNER/REPO, timm's spelling of a Hugging Face hub repository


class WorkdirWriteError(OSError):
  """A write to the workdir failed, its storage failing or no longer answering; the message says which step a
  restart resumes from. Library threads may still be retrying other writes to it (`cli.run` does not wait for them).
  """


def is_url(path: str) -> bool:
  return re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*://', path) is not None


def resolve(path: str | None) -> str | None:
  """`path` absolute, with `~` expanded and no trailing slash; URLs, hub repositories, '' and None unchanged."""
  if not path or is_url(path) or path.startswith(HUB):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
  """`path`/`names`, for a URL as for a local path."""
  return '/'.join([path.rstrip('/'), *names]) if is_url(path) else os.path.join(path, *names)


def at(path: str) -> epath.Path:
  """`path` (resolved) as a pathlib-like object that reads, writes, lists and moves in buckets as on disks."""
  if is_url(path):
    configure_clients()
  return epath.Path(resolve(path))


# ---------------------------------------------------------------------------------------------------- buckets
def bucket_retries(environ=os.environ) -> int:
  """How often a failing bucket request is retried: MIXER_JAX_BUCKET_RETRIES, else BUCKET_RETRIES."""
  text = environ.get(RETRIES_ENV, str(BUCKET_RETRIES))
  if not text.isdigit():
    raise ValueError(f'{RETRIES_ENV}={text!r}: give a whole number of retries >= 0 (default {BUCKET_RETRIES}, '
                     'about 2 minutes)')
  return int(text)


def tensorflow_settings(environ=os.environ) -> dict[str, str]:
  """TensorFlow's GCS retries (its default: 10, up to 32 s apart), which it reads once, when it is imported: the
  package sets them as it is imported (mixer_jax/__init__.py), from MIXER_JAX_BUCKET_RETRIES, the one setting of all
  clients (a child process inherits them: a value of its own would otherwise be ignored). Empty for a malformed
  MIXER_JAX_BUCKET_RETRIES, which `client_settings` reports."""
  try:
    retries = bucket_retries(environ)
  except ValueError:
    return {}
  return {'GCS_RETRY_CONFIG_MAX_RETRIES': str(retries), 'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '1000000',
          'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '32000000'}


def client_settings(environ=os.environ) -> dict[str, str]:
  """The storage clients' settings that `environ` implies: epath on gcsfs always, and with STORAGE_EMULATOR_HOST
  tensorstore's endpoint and what an emulator needs. Checks MIXER_JAX_BUCKET_RETRIES."""
  bucket_retries(environ)
  settings = {'EPATH_USE_TF': '0'}
  emulator = environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    # An emulator has no hierarchical namespaces to probe for (gcsfs would log its failed probe dozens of times),
    # and takes any token (tensorstore would first wait 2-3 s for a metadata server to give it credentials).
    settings.update(TENSORSTORE_GCS_HTTP_URL=emulator if '://' in emulator else f'http://{emulator}',
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false', GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator')
  return settings


def configure_clients() -> None:
  """Applies `client_settings` before the first file is opened; settings the user made are kept. gcsfs lists
  folders afresh each time: other processes and hosts write the same checkpoints folder, and its default listing
  cache, never expired, would hide their steps. An emulator is used anonymously (gcsfs would first look for
  credentials and log that there are none)."""
  for name, value in client_settings().items():
    os.environ.setdefault(name, value)
  import fsspec
  gcsfs = fsspec.config.conf.setdefault('gs', {})
  gcsfs.setdefault('use_listings_cache', False)
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    gcsfs.setdefault('token', 'anon')


def endpoint() -> str:
  return os.environ.get('STORAGE_EMULATOR_HOST') or 'https://storage.googleapis.com'


def check_writable(url: str, what: str, timeout: float = CHECK_SECONDS) -> None:
  """Raises one line now, within about `timeout` seconds, if `url` (gs://bucket/prefix) cannot be written: no
  credentials, no such bucket, no permission, or no answer from the endpoint. Writes and deletes one empty object
  under the prefix (a bucket's permissions are checked by using them)."""
  if not url.startswith('gs://'):
    raise ValueError(f'{what} {url}: only gs:// buckets are supported among URLs: give gs://BUCKET/PATH or a local '
                     'path')
  bucket, _, prefix = url[len('gs://'):].partition('/')
  if not bucket:
    raise ValueError(f'{what} {url}: name a bucket, e.g. gs://my-bucket/runs/mixer')
  configure_clients()
  import google.auth.exceptions
  import requests
  from google.api_core import exceptions
  from google.cloud import storage
  name = '/'.join(filter(None, [prefix.strip('/'), f'.write_check.{socket.gethostname()}.{os.getpid()}']))
  try:
    blob = storage.Client(project=os.environ.get('GOOGLE_CLOUD_PROJECT', '_')).bucket(bucket).blob(name)
    blob.upload_from_string(b'', timeout=timeout, retry=None)
    blob.delete(timeout=timeout, retry=None)
  except google.auth.exceptions.DefaultCredentialsError:
    raise ValueError(f'{what} {url}: no Google Cloud credentials on this machine: run `gcloud auth application-default '
                     'login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file') from None
  except exceptions.NotFound:
    raise ValueError(f'{what} {url}: the bucket gs://{bucket} does not exist: create it (gcloud storage buckets '
                     f'create gs://{bucket}) or correct the name') from None
  except (exceptions.Forbidden, exceptions.Unauthorized) as error:
    raise ValueError(f'{what} {url}: these credentials may not write to gs://{bucket} ({error.code}): grant them '
                     'roles/storage.objectUser on the bucket, or use another bucket') from None
  except (requests.exceptions.RequestException, google.auth.exceptions.TransportError,
          exceptions.ServerError) as error:
    raise ValueError(f'{what} {url}: no answer from {endpoint()} within {timeout:g} s '
                     f'({type(error).__name__}): check the network{_emulator_hint()}') from None


def _emulator_hint() -> str:
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    return ' and that the emulator STORAGE_EMULATOR_HOST names is running'
  return ''


# ------------------------------------------------------------------------------------------------------ files
def write_whole(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader sees the old file or the new one, never a part: locally through a
  temporary file and a rename; in a bucket by one upload (an object appears whole)."""
  if is_url(path):
    at(path).write_text(text)
    return
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def move(source: str, target: str, *, marker: str | None = None) -> None:
  """Moves the folder `source` to `target`, creating target's parent. In a bucket a folder is its objects, and a
  move is a copy and a delete of each: the objects are copied, then `marker` (the file whose presence tells readers
  the folder is complete) is deleted from `source` before the rest, so an interrupted move never leaves a partial
  folder that looks complete at the source."""
  if not is_url(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(source, target)
    return
  folder = at(source)
  for name in files(source):
    (folder / name).copy(at(join(target, name)))
  if marker and (folder / marker).exists():
    (folder / marker).unlink()
  folder.rmtree()


def files(folder: str) -> list[str]:
  """The names of the files under `folder`, at any depth, relative to it ('a/b.txt')."""
  top = at(folder)
  prefix = len(_without_scheme(str(top)).rstrip('/'))  # gcsfs names the folders it walks without gs://
  return sorted('/'.join(filter(None, [_without_scheme(str(parent))[prefix:].strip('/'), name]))
                for parent, _, names in top.walk() for name in names)


def _without_scheme(path: str) -> str:
  return re.sub(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', '', path)


# ------------------------------------------------------------------------------------------- remote files
def is_remote_file(path: str) -> bool:
  """A file to copy here before reading: on the web, on the hub, or in a bucket (a bucket folder, such as an orbax
  checkpoint, is read where it is)."""
  return path.startswith((HUB, 'http://', 'https://')) or (path.startswith('gs://') and not at(path).is_dir())


def cache_folder() -> str:
  return resolve(os.environ.get('MIXER_JAX_CACHE') or '~/.cache/mixer_jax')


def local_copy(path: str, hub_file: str = 'model.safetensors') -> str:
  """A local path holding the file `path`: itself when local or a bucket folder; else a copy in the cache, made
  once and verified before use. A download goes to a temporary name, is checked against what its source announced
  (the size; the MD5 a bucket keeps for each object; the SHA-256 the hub keeps for each large file) and only then
  takes its place, so a cut or corrupted download is never read. `hf-hub:OWNER/REPO` is the repository's
  `hub_file`, through huggingface_hub and its cache."""
  if not is_remote_file(path):
    return path
  if path.startswith(HUB):
    return _from_hub(path[len(HUB):], hub_file)
  scheme, _, rest = path.partition('://')
  target = os.path.join(cache_folder(), scheme, *rest.split('/'))
  if path.startswith('gs://'):
    _from_bucket(path, target)
  elif not os.path.exists(target):  # the web publishes no hash to compare a cached copy with
    _from_web(path, target)
  return target


def _download(path: str, target: str, fetch, size: int, digest: tuple[str, str] | None) -> None:
  """fetch(temporary) writes the file; it takes `target`'s place once its size and digest (hashlib name, hex) are
  those announced."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  temporary = f'{target}.download-{os.getpid()}'
  try:
    try:
      fetch(temporary)
    except (OSError, http.client.HTTPException) as error:  # a connection cut mid-file: IncompleteRead
      raise ValueError(f'{path}: the download failed ({type(error).__name__}): run again') from None
    got = os.path.getsize(temporary)
    if got != size:
      raise ValueError(f'{path}: the download holds {got:,} bytes of the {size:,} announced: run again')
    if digest and _hexdigest(temporary, digest[0]) != digest[1]:
      raise ValueError(f'{path}: the download\'s {digest[0].upper()} differs from the one its source publishes: '
                       'run again')
    os.replace(temporary, target)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _hexdigest(file: str, algorithm: str) -> str:
  with open(file, 'rb') as f:
    return hashlib.file_digest(f, algorithm).hexdigest()


def _from_bucket(url: str, target: str) -> None:
  import fsspec
  configure_clients()
  filesystem, name = fsspec.core.url_to_fs(url)
  try:
    info = filesystem.info(name)
  except FileNotFoundError:
    raise FileNotFoundError(f'{url}: no such object') from None
  md5 = info.get('md5Hash')
  digest = ('md5', base64.b64decode(md5).hex()) if md5 else None
  if os.path.exists(target) and os.path.getsize(target) == info['size'] and (
      digest is None or _hexdigest(target, 'md5') == digest[1]):
    return  # the cached copy is the object as it is now
  _download(url, target, lambda temporary: filesystem.get(name, temporary), info['size'], digest)


def _from_web(url: str, target: str) -> None:
  try:
    response = urllib.request.urlopen(url, timeout=CHECK_SECONDS * 3)
  except urllib.error.HTTPError as error:
    raise FileNotFoundError(f'{url}: the server answers {error.code} {error.reason}') from None
  except (urllib.error.URLError, OSError) as error:
    raise ValueError(f'{url}: cannot download it ({getattr(error, "reason", error)}): check the URL and the '
                     'network') from None
  with response:
    size = int(response.headers.get('Content-Length') or -1)

    def fetch(temporary):
      with open(temporary, 'wb') as f:
        shutil.copyfileobj(response, f, 1 << 20)
    if size < 0:
      raise ValueError(f'{url}: the server does not say how large the file is, so a cut download could not be '
                       'told from a whole one: download it yourself and give the local file')
    _download(url, target, fetch, size, None)


def _from_hub(repo: str, file: str) -> str:
  import huggingface_hub
  from huggingface_hub import constants, errors
  try:
    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: the copy cached (and verified) before
      return huggingface_hub.hf_hub_download(repo, file)
    metadata = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, file))
    local = huggingface_hub.hf_hub_download(repo, file)
  except (errors.RepositoryNotFoundError, errors.EntryNotFoundError, errors.RevisionNotFoundError) as error:
    raise FileNotFoundError(f'{HUB}{repo}: {type(error).__name__}: the hub has no {file} there') from None
  except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, OSError) as error:
    raise ValueError(f'{HUB}{repo}: cannot download {file} ({type(error).__name__}): check the network, or '
                     'download it yourself and give the local file') from None
  sha256 = (metadata.etag or '').strip('"')
  problem = (f'holds {os.path.getsize(local):,} bytes of the {metadata.size:,} the hub announces'
             if os.path.getsize(local) != metadata.size else
             'differs from the SHA-256 the hub publishes'  # a large file's etag is its SHA-256
             if re.fullmatch('[0-9a-f]{64}', sha256) and _hexdigest(local, 'sha256') != sha256 else None)
  if problem:
    os.remove(os.path.realpath(local))  # the hub cache's blob: the next run downloads it again
    raise ValueError(f'{HUB}{repo}: the downloaded {file} {problem}: run again')
  return local


def upload_tree(local: str, url: str) -> None:
  """Copies the files under the local folder `local` to the same names under `url`."""
  for folder, _, names in os.walk(local):
    for name in names:
      source = os.path.join(folder, name)
      at(join(url, *os.path.relpath(source, local).split(os.sep))).write_bytes(epath.Path(source).read_bytes())


class Log:
  """A text file that grows by lines, each one stored when `write` returns (a kill tears at most the line being
  written): appended to on a disk; rewritten whole in a bucket, whose objects cannot be appended to (gcsfs's 'a'
  mode would silently overwrite)."""

  def __init__(self, path: str, text: str = ''):
    """Starts the file at `path` with `text` (replacing what it held)."""
    self._path, self._text = path, text
    write_whole(path, text)
    self._file = None if is_url(path) else open(path, 'a')

  def write(self, line: str) -> None:
    if self._file is None:
      self._text += line
      at(self._path).write_text(self._text)
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
