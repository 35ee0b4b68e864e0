from immunize.cli import main

raise SystemExit(main())
