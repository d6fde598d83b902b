"""imaging-service: `serve` the EC2 VM Import API, and manage `credentials`.

Every setting (imaging_service/config.py) is a flag of each command, an
IMAGING_SERVICE_* variable, or a key of the --config file.
"""

import argparse
import json
import logging
import os
import signal
import sys

from imaging_service import config

EPILOG = ("settings: flag over IMAGING_SERVICE_* variable over --config file over default "
          "(docs/service.md)\nexit codes: 0 success, 1 failure, 2 bad usage or settings")


def parser():
    p = argparse.ArgumentParser(prog="imaging-service", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rows = config.all_settings()
    serve = commands.add_parser("serve", help="run the API, and on embedded defaults the workers and "
                                              "the object store", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(serve, rows)
    # -- celery engine (docs/deployment.md): one worker machine --
    worker = commands.add_parser("worker", help="run a celery-engine worker (conversions of tasks from "
                                                "--broker-url) with its own --work-dir", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    worker.add_argument("action", nargs="?", default="run", choices=["run", "list", "drain", "resume"],
                        help="run (default): this machine's worker; list: the live workers; drain: the named "
                             "workers (default: every one on this host) take no new task, finish theirs and "
                             "keep running; resume: they take tasks again")
    worker.add_argument("names", nargs="*", metavar="NAME", help="worker names, as `worker list` shows them")
    worker.add_argument("--json", action="store_true", help="list: print JSON")
    config.add_arguments(worker, rows)
    # -- end celery engine --
    creds = commands.add_parser("credentials", help="create, list or revoke access keys; make a "
                                  "sign-in token for the queue page")
    verbs = creds.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", help="a new key pair, in a new account unless --account")
    create.add_argument("--account", help="add the key to this existing account (12 digits)")
    create.add_argument("--name", help="a name for the new account")
    create.add_argument("--operator", action="store_true", help="the account sees and runs everything")
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = verbs.add_parser("list", help="the access keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = verbs.add_parser("revoke", help="revoke an access key")
    revoke.add_argument("access_key", metavar="ACCESS_KEY")
    token = verbs.add_parser("token", help="a sign-in token for the queue page (the key's owner signs in "
                                           "with it instead of the secret)")
    token.add_argument("access_key", metavar="ACCESS_KEY")
    token.add_argument("--hours", type=float, default=1.0, help="how long the token is valid (default 1)")
    for sub in (create, listing, revoke, token):
        config.add_arguments(sub, rows)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in {s.name for s in config.all_settings()}}
    try:
        settings = config.resolve(flags)
    except config.ConfigError as e:
        print(f"imaging-service: error: {e}", file=sys.stderr)
        return 2
    # Files the service makes (database, logs, work files) are not for other users.
    os.umask(0o077)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    if settings.log_level.lower() != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "worker":
            return celery_worker(settings) if args.action == "run" else worker_control(args, settings)
        return credentials(args, settings)
    except Exception as e:  # one line for the operator; the traceback with --log-level debug
        logging.getLogger("imaging_service").debug("failed", exc_info=True)
        print(f"imaging-service: error: {e}", file=sys.stderr)
        return 1


def serve(settings):
    import multiprocessing

    from imaging_service.app import Service, api_process, listen_socket, serve_api
    service = Service(settings)
    # uvicorn stops on SIGTERM/SIGINT and then raises the signal again for the handler that was
    # there before it: make that one ours (a no-op), so that the workers and the object store
    # are stopped below instead of the process dying at once.  A signal during the start
    # (the object store takes seconds) is kept: the server then does not run.
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    others = []
    try:
        service.start()
        if stopping:
            return 0
        processes = max(1, settings.api_processes or 1)
        sock = listen_socket(settings.listen, settings.port, reuse_port=processes > 1)
        port = sock.getsockname()[1]
        # Further API processes on the same port (SO_REUSEPORT), started fresh (spawn: this
        # process already runs threads), so that the API uses more than one core.
        spawn = multiprocessing.get_context("spawn")
        store = service.store.endpoint_url if service.store is not None else None
        for n in range(processes - 1):
            child = spawn.Process(target=api_process, args=(settings, port, store, os.getpid()),
                                  name=f"imaging-service-api-{n + 2}")
            child.start()
            others.append(child)
        logging.getLogger("imaging_service").info("EC2 API on http://%s:%s/ (%d process%s; state in %s)",
                                                  settings.listen, port, processes,
                                                  "es" if processes > 1 else "", settings.state_dir)
        serve_api(service, [sock])
    finally:
        for child in others:
            child.terminate()  # SIGTERM: uvicorn finishes the requests it has
        for child in others:
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join()
        service.stop()
    return 0


def celery_worker(settings):
    """`imaging-service worker`: the celery engine's worker on this machine."""
    from imaging_service.app import prepare_state_dir
    from imaging_service.celery_engine import CeleryWorker
    from imaging_service.credentials import Credentials
    from imaging_service.db import Database
    from imaging_service.objectstore import ObjectStore
    if not settings.s3_endpoint:
        raise ValueError("a worker needs --s3-endpoint (the object store the front-ends use)")
    prepare_state_dir(settings.state_dir)
    db = Database(settings.database_url)
    try:
        db.upgrade()
        store = ObjectStore(settings.s3_endpoint, settings.s3_region or settings.region, settings.s3_access_key,
                            settings.s3_secret_key)
        return CeleryWorker(db, settings, store, Credentials(db, settings.key_file)).main(
            loglevel=settings.log_level.upper())
    finally:
        db.dispose()


def worker_control(args, settings):
    """`imaging-service worker list|drain|resume [NAME...]`, through the shared database."""
    import socket

    from imaging_service import celery_engine
    from imaging_service.db import Database
    db = Database(settings.database_url)
    within = 3 * celery_engine.seconds(settings.heartbeat, 2.0) + 5  # as /healthz counts them live
    try:
        if args.action == "list":
            rows = celery_engine.live_workers(db, within)
            if args.json:
                print(json.dumps([dict(r, heartbeat_at=r["heartbeat_at"].isoformat()) for r in rows]))
            for r in [] if args.json else rows:
                print(f"{r['name']}\t{'draining' if r['draining'] else 'taking'}\trunning {r['running']}/"
                      f"{r['concurrency']}\tscratch free {r['scratch_free']}/{r['scratch_capacity']}")
            return 0
        names = args.names
        if not names:  # this host's workers (`hostname/pid-...`)
            host = socket.gethostname() + "/"
            names = [r["name"] for r in celery_engine.live_workers(db, within) if r["name"].startswith(host)]
        found = celery_engine.set_draining(db, names, args.action == "drain", within) if names else []
        for name in found:
            print(f"{name}\t{'draining' if args.action == 'drain' else 'taking tasks'}")
        missing = sorted(set(args.names) - set(found))
        if missing or not found:
            print(f"imaging-service: error: no live worker {' '.join(missing) or 'on this host'}", file=sys.stderr)
            return 1
        return 0
    finally:
        db.dispose()


def credentials(args, settings):
    from imaging_service.app import prepare_state_dir
    from imaging_service.credentials import CredentialError, Credentials
    from imaging_service.db import Database
    prepare_state_dir(settings.state_dir)
    db = Database(settings.database_url)
    try:
        db.upgrade()
        store = Credentials(db, settings.key_file)
        if args.verb == "create":
            access, secret, account = store.create(account_id=args.account, name=args.name,
                                                   operator=args.operator)
            if args.json:
                print(json.dumps({"access_key": access, "secret_key": secret, "account_id": account}))
            else:
                print(f"AccessKeyId\t{access}\nSecretAccessKey\t{secret}\nAccountId\t{account}")
        elif args.verb == "list":
            rows = store.list()
            if args.json:
                print(json.dumps([{"access_key": a, "account_id": acc, "name": n, "operator": op,
                                   "created_at": c.isoformat(), "revoked_at": r.isoformat() if r else None}
                                  for a, acc, n, op, c, r in rows]))
            else:
                for a, acc, n, op, c, r in rows:
                    state = f"revoked {r:%Y-%m-%d %H:%M}" if r else "active"
                    print(f"{a}\t{acc}\t{n or ''}\t{'operator' if op else 'user'}\t{state}")
        elif args.verb == "token":
            from imaging_service.web import Sessions
            if store.lookup(args.access_key) is None:
                raise CredentialError(f"no active access key {args.access_key}")
            print(Sessions(settings.key_file).make_token(args.access_key, args.hours))
        else:
            store.revoke(args.access_key)
            print(f"revoked {args.access_key}")
    except CredentialError as e:
        print(f"imaging-service: error: {e}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
