import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    // The nemesis run (minutes of faults against a cluster) runs alone, after the suite (.ci/run,
    // NEMESIS=1), or on demand (`npm run nemesis`): see test/nemesis/README.md.
    exclude: ["**/node_modules/**", ...(process.env.NEMESIS ? [] : ["test/nemesis/nemesis.test.ts"])],
    globalSetup: ["test/global-setup.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    maxWorkers: 2,
  },
});
