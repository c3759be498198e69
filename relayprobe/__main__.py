from relayprobe.cli import main

raise SystemExit(main())
