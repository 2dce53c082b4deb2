"""Certificates and SuperNode keys for a TLS + SuperNode-authenticated Flower deployment.

Writes into ``--out``:

- ``ca.crt`` / ``ca.key``: a private certificate authority (give ``ca.crt`` to every
  SuperNode and to the ``flwr`` CLI: ``--root-certificates`` / ``root-certificates``);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, valid for ``--host``
  names/IPs (``flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key
  --ssl-ca-certfile ca.crt``);
- ``<name>`` / ``<name>.pub`` for each ``--supernode NAME``: an EC P-384 key pair in
  OpenSSH format (``flower-supernode --auth-supernode-private-key <name>``; register the
  public key with ``flwr supernode register <name>.pub <connection>``).

Uses the ``cryptography`` package (a Flower dependency). For production, prefer your
organisation's PKI; each organisation should create its own SuperNode key on its own
machine and send only the ``.pub`` file to the federation's operator.

    python scripts/make_certs.py --out certs --host 127.0.0.1 --host localhost \
        --supernode org-a --supernode org-b
    python scripts/make_certs.py --out keys --keys-only --supernode org-a   # at org A
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` signed by it; returns the file paths."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fatellm-flwr test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False),
                   critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, plain), True),
        "server_cert": _write(out / "server.pem", cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", key.private_bytes(pem, pkcs8, plain), True),
    }


def make_supernode_key(out: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: ``(private key, public key)`` paths."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return _write(out / name, private, True), _write(out / f"{name}.pub", public + b"\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--host", action="append", default=None,
                    help="SuperLink host name or IP the certificate is valid for (repeatable; "
                         "default 127.0.0.1 and localhost)")
    ap.add_argument("--supernode", action="append", default=[],
                    help="create a SuperNode key pair with this name (repeatable)")
    ap.add_argument("--days", type=int, default=365, help="certificate validity")
    ap.add_argument("--keys-only", action="store_true",
                    help="only the --supernode key pairs (what an organisation runs on its "
                         "own machine), no CA or server certificate")
    args = ap.parse_args(argv)
    files = {} if args.keys_only else make_tls(args.out, args.host or ["127.0.0.1", "localhost"],
                                               args.days)
    for name in args.supernode:
        priv, pub = make_supernode_key(args.out, name)
        files[f"supernode {name}"] = priv
        files[f"supernode {name} (public)"] = pub
    for what, path in files.items():
        print(f"{what}: {path}")


if __name__ == "__main__":
    main()
