from p2pserver.cli import main

raise SystemExit(main())
