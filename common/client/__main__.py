"""`python -m common.client`: see common/client/cli.py."""

from common.client.cli import main

raise SystemExit(main())
